//! The misbehaviours themselves, and reading their parameters. No WIT types here.

use std::io::Write;

use serde_json::{Map, Value};

pub const MIB: usize = 1024 * 1024;
/// Size of each write in `spew` and `stderr` modes, at most.
pub const WRITE_CHUNK: usize = 64 * 1024;
/// What `spew` and `stderr` write, over and over.
pub const SPEW_LINE: &[u8] = b"spew spew spew spew spew spew spew spew spew spew spew spew spew\n";

/// Loops forever. `black_box` keeps the optimiser from proving the loop does nothing.
pub fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

/// Allocates `mib` 1 MiB blocks, filling each so every page is really used, and keeps
/// them all alive. When memory runs out the allocator aborts, which is a trap.
pub fn grow(mib: u64) -> u64 {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for _ in 0..mib {
        // A non-zero fill: a zeroed allocation of fresh memory may never be written.
        blocks.push(std::hint::black_box(vec![0xa5; MIB]));
    }
    std::hint::black_box(&blocks);
    mib
}

/// Writes `bytes` bytes of [`SPEW_LINE`]s to `out` in writes of at most 64 KiB, stopping
/// at the first error. Returns how many bytes `out` accepted.
pub fn spew(out: &mut impl Write, bytes: u64) -> u64 {
    let line = SPEW_LINE.len() as u64;
    // Whole lines per chunk, so a line-buffered stdout passes every write straight through
    // and the count is what reached the host, not what sits in a buffer.
    let chunk = SPEW_LINE.repeat(WRITE_CHUNK / SPEW_LINE.len());
    let mut written = 0u64;
    while written < bytes {
        // The output is one long run of lines; `offset` is where this write starts in it.
        let offset = usize::try_from(written % line).unwrap_or(0);
        let room = chunk.len() - offset;
        let len = usize::try_from(bytes - written).map_or(room, |left| left.min(room));
        match out.write(&chunk[offset..offset + len]) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    // A last partial line may still be buffered; if it cannot be flushed it was not written.
    if out.flush().is_err() {
        written -= written % line;
    }
    written
}

/// Opens a TCP connection to `addr` (`ip:port`, or `name:port` resolved through the
/// host) and closes it again.
pub fn connect(addr: &str) -> Result<(), String> {
    let result = match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => std::net::TcpStream::connect(sa),
        Err(_) => std::net::TcpStream::connect(addr),
    };
    result
        .map(drop)
        .map_err(|e| format!("could not connect to {addr}: {e}"))
}

/// Reads an optional list-of-strings parameter; absent is empty.
pub fn strings(args: &Map<String, Value>, name: &str) -> Result<Vec<String>, String> {
    let bad = || format!("\"{name}\" must be a list of strings");
    match args.get(name) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Reads an optional 32-bit non-negative integer parameter; absent is `None`.
pub fn optional_u32(args: &Map<String, Value>, name: &str) -> Result<Option<u32>, String> {
    args.get(name)
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("\"{name}\" must be a 32-bit non-negative integer"))
        })
        .transpose()
}

/// Reads an optional non-negative integer parameter.
pub fn count(args: &Map<String, Value>, name: &str, default: u64) -> Result<u64, String> {
    match args.get(name) {
        None => Ok(default),
        Some(value) => value
            .as_u64()
            .ok_or_else(|| format!("\"{name}\" must be a non-negative integer")),
    }
}

/// Reads an optional number parameter.
pub fn number(args: &Map<String, Value>, name: &str, default: f64) -> Result<f64, String> {
    match args.get(name) {
        None => Ok(default),
        Some(value) => value
            .as_f64()
            .ok_or_else(|| format!("\"{name}\" must be a number")),
    }
}

/// Reads an optional string parameter.
pub fn string<'a>(
    args: &'a Map<String, Value>,
    name: &str,
    default: &'a str,
) -> Result<&'a str, String> {
    match args.get(name) {
        None => Ok(default),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("\"{name}\" must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A writer that accepts `limit` bytes, at most `max_write` at a time, then fails.
    struct Limited {
        got: Vec<u8>,
        limit: usize,
        max_write: usize,
    }

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            assert!(buf.len() <= WRITE_CHUNK);
            let room = self.limit - self.got.len();
            if room == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(room).min(self.max_write);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn expected_stream(len: usize) -> Vec<u8> {
        SPEW_LINE.iter().copied().cycle().take(len).collect()
    }

    #[test]
    fn spew_writes_exactly_the_requested_lines() {
        for (bytes, max_write) in [
            (0, WRITE_CHUNK),
            (10, 7),
            (200_000, WRITE_CHUNK),
            (200_000, 1000),
        ] {
            let mut out = Limited {
                got: Vec::new(),
                limit: usize::MAX,
                max_write,
            };
            assert_eq!(spew(&mut out, bytes as u64), bytes as u64);
            assert_eq!(out.got, expected_stream(bytes));
        }
    }

    #[test]
    fn spew_stops_at_the_first_error() {
        let mut out = Limited {
            got: Vec::new(),
            limit: 100_000,
            max_write: WRITE_CHUNK,
        };
        assert_eq!(spew(&mut out, 8 * MIB as u64), 100_000);
        assert_eq!(out.got, expected_stream(100_000));
    }

    #[test]
    fn grow_keeps_what_it_allocates() {
        assert_eq!(grow(3), 3);
    }

    #[test]
    fn parameters_are_checked() {
        let args = json!({"n": 5, "neg": -1, "s": "x", "f": 1.5});
        let args = args.as_object().unwrap();
        assert_eq!(count(args, "n", 1), Ok(5));
        assert_eq!(count(args, "missing", 7), Ok(7));
        assert!(count(args, "neg", 1).is_err());
        assert!(count(args, "s", 1).is_err());
        assert_eq!(number(args, "f", 0.0), Ok(1.5));
        assert_eq!(number(args, "n", 0.0), Ok(5.0));
        assert!(number(args, "s", 0.0).is_err());
        assert_eq!(string(args, "s", "d"), Ok("x"));
        assert_eq!(string(args, "missing", "d"), Ok("d"));
        assert!(string(args, "n", "d").is_err());
        let args = json!({"a": ["x", "y"], "bad": ["x", 1], "s": "x"});
        let args = args.as_object().unwrap();
        assert_eq!(strings(args, "a"), Ok(vec!["x".into(), "y".into()]));
        assert_eq!(strings(args, "missing"), Ok(vec![]));
        assert!(strings(args, "bad").is_err());
        assert!(strings(args, "s").is_err());
        let args = json!({"t": 5, "big": 5_000_000_000u64, "neg": -1});
        let args = args.as_object().unwrap();
        assert_eq!(optional_u32(args, "t"), Ok(Some(5)));
        assert_eq!(optional_u32(args, "missing"), Ok(None));
        assert!(optional_u32(args, "big").is_err());
        assert!(optional_u32(args, "neg").is_err());
    }

    #[test]
    fn connect_reports_success_and_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        assert_eq!(connect(&addr), Ok(()));
        drop(listener);
        let err = connect(&addr).unwrap_err();
        let expected = format!("could not connect to {addr}: ");
        assert!(err.starts_with(&expected), "{err}");
    }
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod digest_tests {
    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
