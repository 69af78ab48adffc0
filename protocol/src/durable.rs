//! Files that survive a crash: the one way both binaries write state to disk.
//!
//! Every write goes to a temporary file beside the target, is flushed with `fsync`, and
//! is renamed over the target; then the directory is flushed too, so the rename itself
//! survives a power cut. A reader sees the old file or the new one, never half of
//! either, and once a call returns the new one is on disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of files holding secrets: keys, tokens, credentials.
pub const PRIVATE: u32 = 0o600;
/// Mode of ordinary files.
pub const SHARED: u32 = 0o644;

/// Replaces `path` with `bytes`, durably.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, SHARED, |f| f.write_all(bytes))
}

/// Replaces `path` with `bytes` readable by its owner only, durably.
pub fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, PRIVATE, |f| f.write_all(bytes))
}

/// Replaces `path` with what `fill` writes to a fresh file of mode `mode`, durably.
/// If `fill` fails, `path` is left as it was.
pub fn replace_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = write_temp(path, mode, fill)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Creates `path` with `bytes`, readable by its owner only, durably; fails with
/// [`io::ErrorKind::AlreadyExists`] if it exists, leaving it untouched.
pub fn create_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_temp(path, PRIVATE, |f| f.write_all(bytes))?;
    // A hard link fails if the name is taken, where a rename would replace it.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked?;
    sync_parent(path)
}

/// Flushes a directory, so that names created, renamed or removed in it stay so.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Writes a uniquely named temporary file beside `path` and flushes it.
fn write_temp(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<PathBuf> {
    // Unique per writer: threads, and several agents in one process, may write the
    // same file at once.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}.{n}", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp)?;
    let written = fill(&mut f).and_then(|()| f.sync_all());
    if let Err(e) = written {
        drop(f);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Whether a file name is one of this module's temporary files, which a crash can leave
/// behind: readers of a directory skip them, and may delete them.
pub fn is_temp(name: &str) -> bool {
    name.rsplit_once(".tmp").is_some_and(|(_, rest)| {
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-durable-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replace_swaps_the_whole_file_and_leaves_no_temporary() {
        let d = dir("replace");
        let p = d.join("state.json");
        replace(&p, b"one").unwrap();
        replace(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file() {
        let d = dir("fail");
        let p = d.join("f");
        replace(&p, b"old").unwrap();
        let e = replace_with(&p, SHARED, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    #[cfg(unix)]
    fn private_files_are_the_owners_and_create_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = dir("private");
        let p = d.join("key");
        create_private(&p, b"secret").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = create_private(&p, b"other").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        replace_private(&p, b"rotated").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode, std::fs::read(&p).unwrap()),
            (0o600, b"rotated".to_vec())
        );
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn temporary_names_are_recognised() {
        assert!(is_temp("0001.res.tmp123.4"));
        assert!(is_temp("keyset.json.tmp9.0"));
        assert!(!is_temp("keyset.json"));
        assert!(!is_temp("a.tmp"));
        assert!(!is_temp("a.tmpx"));
    }
}
