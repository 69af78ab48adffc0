//! What the agent must remember across restarts to stay safe: the trusted key set, the
//! job envelopes it has accepted (replay protection), and the highest version of each
//! plugin it has installed (rollback protection).
//!
//! Everything lives in the agent's data directory, written before it is relied on:
//! accepted envelopes are appended and fsync'd before the job runs; key sets and
//! high-water marks are replaced atomically. The envelope log is opened for each append
//! rather than held open (a simulated fleet of thousands of agents in one process would
//! otherwise hold one descriptor per agent, and every program it starts copies the
//! descriptor table), and is rewritten with only the unexpired entries once expired
//! ones make up most of it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use drover_protocol::durable;
use drover_protocol::keys::PublicKey;
use drover_protocol::keyset::{KeySet, KeySetError};
use drover_protocol::signed::Signed;
use serde::{Deserialize, Serialize};

/// Lines of expired entries the accepted-envelope log may carry beyond twice the live
/// ones before it is rewritten.
const SEEN_LOG_SLACK: usize = 1024;

/// The highest version of a plugin this agent has installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWater {
    /// The version.
    pub version: u64,
    /// Its digest.
    pub sha256: String,
}

struct Inner {
    keyset: KeySet,
    seen: HashMap<(String, u32), u64>,
    /// The accepted-envelope log, and how many lines it holds.
    seen_log: PathBuf,
    seen_log_lines: usize,
    high_water: BTreeMap<String, HighWater>,
}

/// The agent's persistent safety state.
pub struct State {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

/// The accepted-envelope log's text for `seen`: one `JOB ATTEMPT EXPIRY` line each.
fn seen_log_text(seen: &HashMap<(String, u32), u64>) -> String {
    seen.iter()
        .map(|((id, a), e)| format!("{id} {a} {e}\n"))
        .collect()
}

fn trust_path(dir: &Path) -> PathBuf {
    dir.join("keyset.json")
}

impl State {
    /// Opens the state in `dir`. The key set comes from `dir` if an earlier run stored
    /// one; otherwise `initial` must verify against the configured roots.
    pub fn open(
        dir: &Path,
        roots: &[PublicKey],
        root_threshold: u32,
        initial: Option<&Path>,
        now_ms: u64,
    ) -> anyhow::Result<State> {
        std::fs::create_dir_all(dir)?;
        for e in std::fs::read_dir(dir)?.flatten() {
            // A replacement a crash cut short: the file it was to replace is intact.
            if durable::is_temp(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let stored = trust_path(dir);
        let keyset = if stored.exists() {
            let signed: Signed<KeySet> = serde_json::from_slice(&std::fs::read(&stored)?)
                .with_context(|| format!("reading {}", stored.display()))?;
            // The stored set was verified when it was accepted; its own roots signed it.
            let ks = signed.unverified()?;
            signed
                .verify_threshold(&ks.roots, ks.root_threshold as usize)
                .with_context(|| format!("{} is not signed by its roots", stored.display()))?
        } else {
            let path = initial.context(
                "no key set: set trust.keyset_file to the key set the server issued (drover agents add writes one)",
            )?;
            let signed: Signed<KeySet> = serde_json::from_slice(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("parsing {}", path.display()))?;
            let ks = KeySet::verify_initial(&signed, roots, root_threshold).with_context(|| {
                format!("{} does not verify against trust.roots", path.display())
            })?;
            durable::replace(&stored, &serde_json::to_vec(&signed)?)?;
            ks
        };

        // Accepted envelopes: keep the unexpired ones, rewrite the log compactly.
        let log_path = dir.join("seen-envelopes.log");
        let mut seen = HashMap::new();
        if let Ok(f) = File::open(&log_path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                let mut parts = line.split_whitespace();
                if let (Some(id), Some(attempt), Some(exp)) =
                    (parts.next(), parts.next(), parts.next())
                    && let (Ok(attempt), Ok(exp)) = (attempt.parse::<u32>(), exp.parse::<u64>())
                    && exp >= now_ms
                {
                    seen.insert((id.to_string(), attempt), exp);
                }
            }
        }
        durable::replace(&log_path, seen_log_text(&seen).as_bytes())?;
        let seen_log_lines = seen.len();

        let hw_path = dir.join("plugin-versions.json");
        let high_water = match std::fs::read(&hw_path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing {}", hw_path.display()))?,
            Err(_) => BTreeMap::new(),
        };
        Ok(State {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                keyset,
                seen,
                seen_log: log_path,
                seen_log_lines,
                high_water,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current key set.
    pub fn keyset(&self) -> KeySet {
        self.lock().keyset.clone()
    }

    /// Offers a new key set; adopts and stores it if the current roots signed it and it
    /// is newer. `Ok(false)` for the one already held.
    pub fn offer_keyset(&self, signed: &Signed<KeySet>) -> Result<bool, KeySetError> {
        let mut inner = self.lock();
        if let Ok(ks) = signed.unverified()
            && ks == inner.keyset
        {
            return Ok(false);
        }
        let next = inner.keyset.verify_successor(signed)?;
        let bytes = serde_json::to_vec(signed).expect("key sets serialise");
        durable::replace(&trust_path(&self.dir), &bytes)
            .map_err(|e| KeySetError::Invalid(format!("cannot store the key set: {e}")))?;
        inner.keyset = next;
        Ok(true)
    }

    /// Records an envelope as accepted, durably, unless it was accepted before.
    /// Returns `Err(true)` for a replay, `Err(false)` when it cannot be recorded.
    pub fn accept_envelope(
        &self,
        job_id: &str,
        attempt: u32,
        expires_ms: u64,
        now_ms: u64,
        grace_ms: u64,
    ) -> Result<(), EnvelopeRefusal> {
        let mut inner = self.lock();
        inner.seen.retain(|_, exp| *exp + grace_ms >= now_ms);
        let key = (job_id.to_string(), attempt);
        if inner.seen.contains_key(&key) {
            return Err(EnvelopeRefusal::Replayed);
        }
        if job_id.is_empty() || job_id.contains(char::is_whitespace) {
            return Err(EnvelopeRefusal::Unrecordable(
                "job id is empty or has spaces".into(),
            ));
        }
        let expiry = expires_ms + grace_ms;
        let line = format!("{job_id} {attempt} {expiry}\n");
        let inner = &mut *inner;
        if inner.seen_log_lines >= 2 * inner.seen.len() + SEEN_LOG_SLACK {
            // Mostly expired entries: rewrite it with the live ones and this one.
            let mut all = seen_log_text(&inner.seen);
            all.push_str(&line);
            // Flushed with its directory: the new line must not vanish with the rename.
            durable::replace(&inner.seen_log, all.as_bytes())
                .map_err(|e| EnvelopeRefusal::Unrecordable(e.to_string()))?;
            inner.seen_log_lines = inner.seen.len() + 1;
        } else {
            OpenOptions::new()
                .append(true)
                .open(&inner.seen_log)
                .and_then(|mut f| {
                    f.write_all(line.as_bytes())?;
                    f.sync_data()
                })
                .map_err(|e| EnvelopeRefusal::Unrecordable(e.to_string()))?;
            inner.seen_log_lines += 1;
        }
        inner.seen.insert(key, expiry);
        Ok(())
    }

    /// Whether this envelope was accepted before (and is still remembered).
    pub fn was_accepted(&self, job_id: &str, attempt: u32) -> bool {
        self.lock()
            .seen
            .contains_key(&(job_id.to_string(), attempt))
    }

    /// Refuses a plugin older than the newest installed, or the same version with a
    /// different digest.
    pub fn check_plugin(&self, name: &str, version: u64, sha256: &str) -> Result<(), String> {
        match self.lock().high_water.get(name) {
            Some(hw) if version < hw.version => Err(format!(
                "plugin {name} version {version} is older than installed version {}; downgrade refused",
                hw.version
            )),
            Some(hw) if version == hw.version && sha256 != hw.sha256 => Err(format!(
                "plugin {name} version {version} has digest {sha256}, but that version was installed with digest {}; refused",
                hw.sha256
            )),
            _ => Ok(()),
        }
    }

    /// Whether exactly this plugin version is the one installed.
    pub fn is_installed(&self, name: &str, version: u64, sha256: &str) -> bool {
        self.lock()
            .high_water
            .get(name)
            .is_some_and(|hw| hw.version == version && hw.sha256 == sha256)
    }

    /// Raises the high-water mark after a verified install.
    pub fn record_plugin(&self, name: &str, version: u64, sha256: &str) -> anyhow::Result<()> {
        let mut inner = self.lock();
        if inner
            .high_water
            .get(name)
            .is_some_and(|hw| hw.version >= version)
        {
            return Ok(());
        }
        inner.high_water.insert(
            name.to_string(),
            HighWater {
                version,
                sha256: sha256.to_string(),
            },
        );
        let bytes = serde_json::to_vec_pretty(&inner.high_water)?;
        durable::replace(&self.dir.join("plugin-versions.json"), &bytes)?;
        Ok(())
    }
}

/// Why an envelope was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeRefusal {
    /// Seen before.
    Replayed,
    /// Could not be written down, so it cannot be protected against replay.
    Unrecordable(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::keys::SigningKey;

    fn keyset_file(dir: &Path, root: &SigningKey) -> PathBuf {
        let ks = KeySet {
            version: 1,
            roots: vec![root.public()],
            root_threshold: 1,
            publishers: vec![SigningKey::generate().public()],
            publisher_threshold: 1,
            control_plane: vec![SigningKey::generate().public()],
            issued_at: 0,
        };
        let p = dir.join("initial.json");
        std::fs::write(&p, serde_json::to_vec(&Signed::sign(&ks, root)).unwrap()).unwrap();
        p
    }

    /// A fresh test directory named after `tag`, a root key, and an initial key set file
    /// signed by it.
    fn fresh(tag: &str) -> (PathBuf, SigningKey, PathBuf) {
        let dir = std::env::temp_dir().join(format!("drover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let root = SigningKey::generate();
        let init = keyset_file(&dir, &root);
        (dir, root, init)
    }

    #[test]
    fn replays_and_downgrades_are_refused_across_restarts() {
        let (dir, root, init) = fresh("state");
        let state_dir = dir.join("state");
        let s = State::open(&state_dir, &[root.public()], 1, Some(&init), 1000).unwrap();
        s.accept_envelope("job-1", 1, 10_000, 1000, 0).unwrap();
        assert_eq!(
            s.accept_envelope("job-1", 1, 10_000, 1000, 0),
            Err(EnvelopeRefusal::Replayed)
        );
        s.accept_envelope("job-1", 2, 10_000, 1000, 0).unwrap();
        s.check_plugin("inv", 3, "aa").unwrap();
        s.record_plugin("inv", 3, "aa").unwrap();
        drop(s);

        // A restart remembers both; a wrong root cannot replace the stored key set.
        let s = State::open(
            &state_dir,
            &[SigningKey::generate().public()],
            1,
            None,
            2000,
        )
        .unwrap();
        assert_eq!(
            s.accept_envelope("job-1", 1, 10_000, 2000, 0),
            Err(EnvelopeRefusal::Replayed)
        );
        assert!(
            s.check_plugin("inv", 2, "bb")
                .unwrap_err()
                .contains("downgrade")
        );
        assert!(
            s.check_plugin("inv", 3, "bb")
                .unwrap_err()
                .contains("digest")
        );
        s.check_plugin("inv", 3, "aa").unwrap();
        s.check_plugin("inv", 4, "cc").unwrap();
        drop(s);

        // Expired entries are forgotten.
        let s = State::open(&state_dir, &[], 1, None, 20_000).unwrap();
        s.accept_envelope("job-1", 1, 30_000, 20_000, 0).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_envelope_log_is_compacted_while_running_and_keeps_the_live_entries() {
        let (dir, root, init) = fresh("state-log");
        let state_dir = dir.join("state");
        let log = state_dir.join("seen-envelopes.log");
        let lines = || std::fs::read_to_string(&log).unwrap().lines().count();
        let s = State::open(&state_dir, &[root.public()], 1, Some(&init), 0).unwrap();
        // Each envelope expires before the next arrives, except the last few.
        let n = 3 * SEEN_LOG_SLACK;
        for i in 0..n {
            let now = i as u64 * 10;
            let expires = if i + 5 >= n { u64::MAX / 2 } else { now + 5 };
            s.accept_envelope(&format!("job-{i}"), 1, expires, now, 0)
                .unwrap();
        }
        // Rewritten at least once along the way: far fewer lines than envelopes.
        assert!(lines() <= SEEN_LOG_SLACK + 5, "{} lines", lines());
        drop(s);
        // The live ones are still refused after a restart; the log stays small.
        let now = n as u64 * 10;
        let s = State::open(&state_dir, &[], 1, None, now).unwrap();
        for i in n - 5..n {
            assert_eq!(
                s.accept_envelope(&format!("job-{i}"), 1, u64::MAX / 2, now, 0),
                Err(EnvelopeRefusal::Replayed)
            );
        }
        assert_eq!(lines(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
