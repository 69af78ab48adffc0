//! The durable outbox: a result is on disk before it is published, and leaves only when
//! the control plane acknowledges it end to end (not when the broker does).
//!
//! One file per result, `{seq:016}.res`, framed as `"DRO1" | len (u32 BE) | sha256 |
//! payload` and written with `drover_protocol::durable` (a temporary file, fsync, rename,
//! directory fsync), so a crash leaves either the whole file or a temporary file that is
//! discarded on start. A file whose length or
//! checksum is wrong (a torn or damaged write) is reported, counted and moved aside.
//! The outbox is bounded by count, bytes and age; what a bound drops is logged and
//! counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::io::Write as _;

use anyhow::Context as _;
use drover_protocol::durable;
use drover_protocol::link::LinkHandle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const MAGIC: &[u8; 4] = b"DRO1";
/// How long to wait for an acknowledgement before publishing again.
const RESEND_AFTER: Duration = Duration::from_secs(10);

/// The outbox's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most results kept.
    pub max_entries: usize,
    /// Most bytes kept.
    pub max_bytes: u64,
    /// Oldest result kept.
    pub max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 10_000,
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Results stored.
    pub stored: AtomicU64,
    /// Results acknowledged and removed.
    pub acked: AtomicU64,
    /// Results dropped because the outbox was full.
    pub dropped_full: AtomicU64,
    /// Results dropped because they were too old.
    pub dropped_age: AtomicU64,
    /// Files found torn or damaged.
    pub corrupt: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    job_id: String,
    attempt: u32,
    /// SHA-256 (hex) of the result message, as published: what an ack must name.
    sha256: String,
    len: u64,
    created: std::time::SystemTime,
    last_sent: Option<Instant>,
}

/// The outbox.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    limits: Limits,
    entries: Mutex<(u64, BTreeMap<u64, Entry>)>,
    wake: Notify,
    /// Counters.
    pub stats: Stats,
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, payload).as_ref());
    out.extend_from_slice(payload);
    out
}

fn unframe(bytes: &[u8]) -> Result<&[u8], &'static str> {
    if bytes.len() < 40 || &bytes[..4] != MAGIC {
        return Err("not an outbox record");
    }
    let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let payload = bytes.get(40..).ok_or("truncated")?;
    if payload.len() != len {
        return Err("length does not match: torn write");
    }
    if ring::digest::digest(&ring::digest::SHA256, payload).as_ref() != &bytes[8..40] {
        return Err("checksum does not match: damaged");
    }
    Ok(payload)
}

/// The (job, attempt) a stored result is for, read from its payload.
fn key_of(payload: &[u8]) -> Option<(String, u32)> {
    #[derive(serde::Deserialize)]
    struct Outer {
        payload: String,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        job_id: String,
        attempt: u32,
    }
    let o: Outer = serde_json::from_slice(payload).ok()?;
    let i: Inner = serde_json::from_str(&o.payload).ok()?;
    Some((i.job_id, i.attempt))
}

/// Whether the fault tests asked this process to crash at `point`, through the
/// `DROVER_TEST_CRASH` variable. Debug builds only: release builds have no such hook.
#[cfg(debug_assertions)]
pub fn crash_point(point: &str) -> bool {
    std::env::var("DROVER_TEST_CRASH").is_ok_and(|v| v == point)
}

/// Release builds never crash on purpose.
#[cfg(not(debug_assertions))]
pub fn crash_point(_point: &str) -> bool {
    false
}

impl Outbox {
    /// Opens the outbox in `dir`, keeping what an earlier run left.
    pub fn open(dir: &Path, limits: Limits) -> anyhow::Result<Outbox> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stats = Stats::default();
        let mut entries = BTreeMap::new();
        let mut next = 0u64;
        for e in std::fs::read_dir(dir)?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if durable::is_temp(&name) {
                // Never renamed into place: the result it held was not yet promised to
                // anyone; the job is reported as interrupted instead.
                tracing::warn!(file = %path.display(), "discarding an outbox write cut short by a crash");
                stats.corrupt.fetch_add(1, Ordering::Relaxed);
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".res")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = std::fs::read(&path)?;
            let parsed = unframe(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|p| key_of(p).ok_or_else(|| "not a signed job result".to_string()));
            match parsed {
                Ok((job_id, attempt)) => {
                    let created = e.metadata()?.modified()?;
                    entries.insert(
                        seq,
                        Entry {
                            job_id,
                            attempt,
                            sha256: hex::encode(&bytes[8..40]),
                            len: bytes.len() as u64,
                            created,
                            last_sent: None,
                        },
                    );
                    next = next.max(seq + 1);
                }
                Err(why) => {
                    tracing::error!(file = %path.display(), "outbox record refused ({why}); moved to outbox/damaged");
                    stats.corrupt.fetch_add(1, Ordering::Relaxed);
                    let damaged = dir.join("damaged");
                    let _ = std::fs::create_dir_all(&damaged);
                    let _ = std::fs::rename(&path, damaged.join(&name));
                }
            }
        }
        if !entries.is_empty() {
            tracing::info!(
                pending = entries.len(),
                "outbox has results from an earlier run"
            );
        }
        Ok(Outbox {
            dir: dir.to_path_buf(),
            limits,
            entries: Mutex::new((next, entries)),
            wake: Notify::new(),
            stats,
        })
    }

    /// Whether a result for this job and attempt is waiting in the outbox.
    pub fn holds(&self, job_id: &str, attempt: u32) -> bool {
        let g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        g.1.values()
            .any(|e| e.job_id == job_id && e.attempt == attempt)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016}.res"))
    }

    /// Stores a signed result durably. Only then may it be published.
    pub fn push(&self, job_id: &str, attempt: u32, payload: &[u8]) -> anyhow::Result<()> {
        let bytes = frame(payload);
        let seq = {
            let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            g.0 += 1;
            g.0 - 1
        };
        let path = self.path(seq);
        durable::replace_with(&path, durable::SHARED, |f| {
            if crash_point("outbox-mid-write") {
                // Half a record on disk, then the process dies: a torn write.
                f.write_all(&bytes[..bytes.len() / 2])?;
                f.sync_all()?;
                std::process::abort();
            }
            f.write_all(&bytes)
        })
        .with_context(|| format!("writing result to the outbox {}", self.dir.display()))?;
        if crash_point("outbox-after-write") {
            std::process::abort();
        }
        {
            let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            g.1.insert(
                seq,
                Entry {
                    job_id: job_id.to_string(),
                    attempt,
                    sha256: hex::encode(&bytes[8..40]),
                    len: bytes.len() as u64,
                    created: std::time::SystemTime::now(),
                    last_sent: None,
                },
            );
            self.enforce_bounds(&mut g.1);
        }
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(())
    }

    fn enforce_bounds(&self, entries: &mut BTreeMap<u64, Entry>) {
        let now = std::time::SystemTime::now();
        let too_old: Vec<u64> = entries
            .iter()
            .filter(|(_, e)| {
                now.duration_since(e.created).unwrap_or_default() > self.limits.max_age
            })
            .map(|(s, _)| *s)
            .collect();
        for s in too_old {
            if let Some(e) = entries.remove(&s) {
                let _ = std::fs::remove_file(self.path(s));
                let n = self.stats.dropped_age.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(job.id = %e.job_id, dropped_total = n, "outbox: result older than the age bound dropped");
            }
        }
        let mut bytes: u64 = entries.values().map(|e| e.len).sum();
        while entries.len() > self.limits.max_entries || bytes > self.limits.max_bytes {
            let Some((s, e)) = entries.pop_first() else {
                break;
            };
            bytes -= e.len;
            let _ = std::fs::remove_file(self.path(s));
            let n = self.stats.dropped_full.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(job.id = %e.job_id, dropped_total = n, "outbox full: oldest result dropped");
        }
    }

    /// The control plane has stored the result of (job, attempt) whose message has the
    /// digest `sha256` (hex): forget it. A result with another digest stays: the ack
    /// is not for it.
    pub fn ack(&self, job_id: &str, attempt: u32, sha256: &str) -> bool {
        let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let seqs: Vec<u64> =
            g.1.iter()
                .filter(|(_, e)| e.job_id == job_id && e.attempt == attempt && e.sha256 == sha256)
                .map(|(s, _)| *s)
                .collect();
        for s in &seqs {
            g.1.remove(s);
            let _ = std::fs::remove_file(self.path(*s));
            self.stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        !seqs.is_empty()
    }

    /// Results waiting for an acknowledgement.
    pub fn pending(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .len()
    }

    /// The results due at `now`, oldest first: those never sent (since the last
    /// connect), and those sent [`RESEND_AFTER`] ago or more without an acknowledgement.
    fn due(&self, now: Instant) -> Vec<u64> {
        let g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        g.1.iter()
            .filter(|(_, e)| {
                e.last_sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= RESEND_AFTER)
            })
            .map(|(s, _)| *s)
            .collect()
    }

    /// Result `seq` was published at `now`.
    fn mark_sent(&self, seq: u64, now: Instant) {
        let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.1.get_mut(&seq) {
            e.last_sent = Some(now);
        }
    }

    /// Publishes what is due, oldest first: new results at once, unacknowledged ones
    /// again every [`RESEND_AFTER`]. Runs until `stop`.
    pub async fn run(&self, link: LinkHandle, topic: String, stop: CancellationToken) {
        let mut was_connected = false;
        loop {
            let connected = link.is_connected();
            if connected && !was_connected {
                // A new connection: whatever was in flight may be lost; send all again.
                let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                for e in g.1.values_mut() {
                    e.last_sent = None;
                }
            }
            was_connected = connected;
            if connected {
                for seq in self.due(Instant::now()) {
                    let payload = match std::fs::read(self.path(seq)) {
                        Ok(b) => match unframe(&b) {
                            Ok(p) => p.to_vec(),
                            Err(why) => {
                                tracing::error!(
                                    seq,
                                    "outbox record damaged on disk ({why}); dropped"
                                );
                                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                                let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                                g.1.remove(&seq);
                                continue;
                            }
                        },
                        // Acknowledged and removed meanwhile.
                        Err(_) => continue,
                    };
                    if link.publish(topic.clone(), payload, false).await.is_err() {
                        break;
                    }
                    self.mark_sent(seq, Instant::now());
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_result(job: &str, attempt: u32) -> Vec<u8> {
        let inner = serde_json::json!({ "job_id": job, "attempt": attempt }).to_string();
        serde_json::to_vec(&serde_json::json!({ "payload": inner, "signatures": [] })).unwrap()
    }

    /// The digest an ack names for `signed_result(job, attempt)`.
    fn digest(job: &str, attempt: u32) -> String {
        drover_protocol::manifest::sha256_hex(&signed_result(job, attempt))
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-outbox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn results_survive_a_restart_until_acknowledged() {
        let d = dir("restart");
        let o = Outbox::open(&d, Limits::default()).unwrap();
        o.push("j1", 1, &signed_result("j1", 1)).unwrap();
        o.push("j2", 1, &signed_result("j2", 1)).unwrap();
        drop(o);
        let o = Outbox::open(&d, Limits::default()).unwrap();
        assert_eq!(o.pending(), 2);
        // An ack for other bytes than those stored is not for this result.
        assert!(!o.ack("j1", 1, &digest("j2", 1)));
        assert!(o.ack("j1", 1, &digest("j1", 1)));
        assert!(!o.ack("j1", 2, &digest("j1", 2)));
        drop(o);
        let o = Outbox::open(&d, Limits::default()).unwrap();
        assert_eq!(o.pending(), 1);
        // New entries never reuse an old sequence number.
        o.push("j3", 1, &signed_result("j3", 1)).unwrap();
        assert_eq!(o.pending(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_and_damaged_records_are_reported_not_trusted() {
        let d = dir("torn");
        let o = Outbox::open(&d, Limits::default()).unwrap();
        o.push("ok", 1, &signed_result("ok", 1)).unwrap();
        o.push("cut", 1, &signed_result("cut", 1)).unwrap();
        drop(o);
        // A write cut short before its rename, and one cut short after a bad rename.
        std::fs::write(d.join("0000000000000009.res.tmp77.0"), b"DRO1 partial").unwrap();
        let cut = d.join("0000000000000001.res");
        let bytes = std::fs::read(&cut).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        let o = Outbox::open(&d, Limits::default()).unwrap();
        assert_eq!(o.pending(), 1);
        assert_eq!(o.stats.corrupt.load(Ordering::Relaxed), 2);
        assert!(d.join("damaged/0000000000000001.res").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bounds_drop_the_oldest_and_count_it() {
        let d = dir("bounds");
        let limits = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        let o = Outbox::open(&d, limits).unwrap();
        for j in ["a", "b", "c"] {
            o.push(j, 1, &signed_result(j, 1)).unwrap();
        }
        assert_eq!(o.pending(), 2);
        assert_eq!(o.stats.dropped_full.load(Ordering::Relaxed), 1);
        assert!(
            !o.ack("a", 1, &digest("a", 1)),
            "the oldest should be the one dropped"
        );
        assert!(o.ack("c", 1, &digest("c", 1)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unacknowledged_results_are_due_again_after_the_resend_interval() {
        let d = dir("resend");
        let o = Outbox::open(&d, Limits::default()).unwrap();
        o.push("a", 1, &signed_result("a", 1)).unwrap();
        let t = Instant::now();
        assert_eq!(o.due(t), [0]);
        o.mark_sent(0, t);
        o.push("b", 1, &signed_result("b", 1)).unwrap();
        assert_eq!(o.due(t), [1], "a new result is due at once");
        o.mark_sent(1, t + Duration::from_secs(5));
        assert!(
            o.due(t + RESEND_AFTER - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(o.due(t + RESEND_AFTER), [0]);
        assert_eq!(o.due(t + Duration::from_secs(5) + RESEND_AFTER), [0, 1]);
        assert!(o.ack("a", 1, &digest("a", 1)));
        assert_eq!(o.due(t + Duration::from_secs(60)), [1]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_is_an_error_not_a_crash() {
        let d = dir("fail");
        let o = Outbox::open(&d, Limits::default()).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        let e = o.push("x", 1, &signed_result("x", 1)).unwrap_err();
        assert!(
            format!("{e:#}").contains("writing result to the outbox"),
            "{e:#}"
        );
        assert_eq!(o.pending(), 0);
    }
}
