//! From a job envelope to a published result: verify, fetch, check, load, run, report.
//!
//! Every refusal becomes a result with a `Rejected` status and a reason, logged and sent
//! to the control plane; nothing a job carries can stop the agent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use drover_protocol::job::{
    Captured, Failure, FailureKind, JobEnvelope, JobResult, ResultStatus, Timings,
};
use drover_protocol::manifest::{Manifest, sha256_hex};
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Up};
use drover_protocol::{link::LinkHandle, now_ms, now_secs};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument as _;

use crate::config::Config;
use crate::fetch::Fetcher;
use crate::runtime::{Grant, Runtime};

/// How far the agent's clock may be behind the control plane's.
const CLOCK_SKEW_MS: u64 = 60_000;

/// Counters, for logs and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs that ran (successfully or not).
    pub ran: AtomicU64,
    /// Jobs refused before running.
    pub refused: AtomicU64,
    /// Jobs dropped because the queue was full.
    pub dropped_busy: AtomicU64,
}

/// Shared state of the job pipeline.
pub struct Executor {
    config: Arc<Config>,
    runtime: Arc<Runtime>,
    link: LinkHandle,
    fetcher: Fetcher,
    seen: Mutex<HashMap<(String, u32), u64>>,
    blob_dir: PathBuf,
    slots: Semaphore,
    /// Counters.
    pub stats: Stats,
}

impl Executor {
    /// Creates the pipeline.
    pub fn new(
        config: Arc<Config>,
        runtime: Arc<Runtime>,
        link: LinkHandle,
        fetcher: Fetcher,
    ) -> anyhow::Result<Arc<Executor>> {
        let blob_dir = config.data_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir)?;
        Ok(Arc::new(Executor {
            slots: Semaphore::new(config.max_concurrent_jobs),
            config,
            runtime,
            link,
            fetcher,
            seen: Mutex::default(),
            blob_dir,
            stats: Stats::default(),
        }))
    }

    /// Takes jobs off `rx` and runs them, at most `max_concurrent_jobs` at once.
    pub async fn serve(self: Arc<Self>, mut rx: mpsc::Receiver<Bytes>) {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(payload) = rx.recv().await {
            // Waiting here for a free slot backs up the bounded queue behind it.
            let Ok(permit) = self.slots.acquire().await else {
                break;
            };
            permit.forget();
            let me = self.clone();
            tasks.spawn(async move {
                me.handle(payload).await;
                me.slots.add_permits(1);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Handles one envelope to the end, publishing its result.
    pub async fn handle(&self, payload: Bytes) {
        let started = Instant::now();
        let started_at_ms = now_ms();
        let result = match self.check_envelope(&payload) {
            Err(refusal) => refusal,
            Ok(env) => {
                let span = tracing::info_span!("job", job.id = %env.job_id, attempt = env.attempt);
                self.execute(env, started, started_at_ms)
                    .instrument(span)
                    .await
            }
        };
        if result.status == ResultStatus::Rejected {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.ran.fetch_add(1, Ordering::Relaxed);
        }
        match &result.failure {
            None => tracing::info!(
                job.id = %result.job_id,
                plugin = %result.plugin,
                duration_ms = result.duration_ms,
                "job succeeded"
            ),
            Some(f) => tracing::warn!(
                job.id = %result.job_id,
                plugin = %result.plugin,
                status = result.status.as_str(),
                kind = ?f.kind,
                "job {}: {}",
                result.status.as_str(),
                f.message
            ),
        }
        self.publish(&result).await;
    }

    async fn publish(&self, result: &JobResult) {
        let body = match serde_json::to_vec(result) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "could not encode result");
                return;
            }
        };
        if let Err(e) = self
            .link
            .publish(topics::up(&self.config.id, Up::Result), body, false)
            .await
        {
            tracing::error!(job.id = %result.job_id, error = %e, "could not publish result");
        }
    }

    /// Checks the envelope: encoding, signature, address, freshness, replay.
    fn check_envelope(&self, payload: &[u8]) -> Result<JobEnvelope, JobResult> {
        let me = &self.config.id;
        let signed: Signed<JobEnvelope> = serde_json::from_slice(payload).map_err(|e| {
            JobResult::refused(
                "",
                me,
                0,
                FailureKind::BadEnvelope,
                format!("job envelope is not valid JSON: {e}"),
            )
        })?;
        // Until the signature checks out, the envelope's own claims are only used to say
        // which job a refusal is about.
        let claimed = signed.unverified().ok();
        let (claimed_id, claimed_attempt) = claimed
            .as_ref()
            .map(|e| (e.job_id.clone(), e.attempt))
            .unwrap_or_default();
        let refuse = |kind, message: String| {
            JobResult::refused(&claimed_id, me, claimed_attempt, kind, message)
        };
        let env = signed.verify(&self.config.control_plane).map_err(|e| {
            refuse(
                FailureKind::BadEnvelope,
                format!("job envelope refused: {e}"),
            )
        })?;
        if &env.agent_id != me {
            return Err(refuse(
                FailureKind::Misaddressed,
                format!("job is addressed to agent {:?}, not this one", env.agent_id),
            ));
        }
        let now = now_ms();
        if now + CLOCK_SKEW_MS < env.not_before_ms {
            return Err(refuse(
                FailureKind::Stale,
                format!(
                    "job is not valid until {} ms from now",
                    env.not_before_ms - now
                ),
            ));
        }
        if now > env.expires_at_ms {
            return Err(refuse(
                FailureKind::Stale,
                format!("job expired {} ms ago", now - env.expires_at_ms),
            ));
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|_, exp| *exp + CLOCK_SKEW_MS >= now);
            let key = (env.job_id.clone(), env.attempt);
            if seen.contains_key(&key) {
                return Err(refuse(
                    FailureKind::Replayed,
                    "job envelope was already received once; replay refused".into(),
                ));
            }
            seen.insert(key, env.expires_at_ms);
        }
        Ok(env)
    }

    async fn execute(&self, env: JobEnvelope, started: Instant, started_at_ms: u64) -> JobResult {
        let me = self.config.id.clone();
        let mut timings = Timings::default();
        let finish = |status: ResultStatus,
                      failure: Option<Failure>,
                      output: Option<serde_json::Value>,
                      stdout: Captured,
                      stderr: Captured,
                      timings: Timings,
                      plugin: &str,
                      version: u64| JobResult {
            job_id: env.job_id.clone(),
            agent_id: me.clone(),
            attempt: env.attempt,
            plugin: plugin.to_string(),
            plugin_version: version,
            status,
            failure,
            output,
            stdout,
            stderr,
            started_at_ms,
            duration_ms: started.elapsed().as_millis() as u64,
            timings,
        };
        let refuse = |kind, message: String, plugin: &str, version: u64| {
            finish(
                ResultStatus::Rejected,
                Some(Failure {
                    kind,
                    message,
                    retryable: false,
                }),
                None,
                Captured::default(),
                Captured::default(),
                Timings::default(),
                plugin,
                version,
            )
        };

        // The plugin: signed by a trusted publisher, valid, allowed by policy.
        let claimed = env.plugin.unverified().ok();
        let (cname, cversion) = claimed
            .as_ref()
            .map(|m| (m.name.clone(), m.version))
            .unwrap_or_default();
        let manifest: Manifest = match env.plugin.verify(&self.config.publishers) {
            Ok(m) => m,
            Err(e) => {
                return refuse(
                    FailureKind::UntrustedPlugin,
                    format!("plugin manifest refused: {e}"),
                    &cname,
                    cversion,
                );
            }
        };
        let (name, version) = (manifest.name.clone(), manifest.version);
        if let Err(e) = manifest.validate() {
            return refuse(
                FailureKind::UntrustedPlugin,
                format!("plugin manifest invalid: {e}"),
                &name,
                version,
            );
        }
        let capabilities = match self.config.policy.grant(&manifest.capabilities) {
            Ok(c) => c,
            Err(missing) => {
                return refuse(
                    FailureKind::PolicyDenied,
                    format!(
                        "plugin asks for capabilities this agent's policy does not allow: {}",
                        missing.join(", ")
                    ),
                    &name,
                    version,
                );
            }
        };
        let cached = self.runtime.is_cached(&manifest.sha256);
        // Expiry stops new installs, never a plugin already installed.
        if !cached && now_secs() > manifest.expires_at {
            return refuse(
                FailureKind::ExpiredPlugin,
                format!(
                    "plugin manifest expired {} s ago; it cannot be installed",
                    now_secs() - manifest.expires_at
                ),
                &name,
                version,
            );
        }
        if manifest.length > self.config.max_plugin_bytes {
            return refuse(
                FailureKind::PolicyDenied,
                format!(
                    "plugin is {} bytes, over this agent's {} byte limit",
                    manifest.length, self.config.max_plugin_bytes
                ),
                &name,
                version,
            );
        }

        // The blob: from the cache, else fetched and checked.
        let blob_path = self.blob_dir.join(format!("{}.wasm", manifest.sha256));
        let mut fetched: Option<Vec<u8>> = None;
        if !cached && !blob_path.exists() {
            let t = Instant::now();
            let blob = match self
                .fetcher
                .fetch(
                    &self.link,
                    &me,
                    &manifest.sha256,
                    manifest.length,
                    self.config.chunk_size,
                )
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    return refuse(FailureKind::FetchFailed, e.to_string(), &name, version);
                }
            };
            timings.fetch_ms = t.elapsed().as_millis() as u64;
            if let Err(msg) = check_blob(&manifest, &blob) {
                return refuse(FailureKind::BlobMismatch, msg, &name, version);
            }
            if let Err(e) = crate::runtime::write_atomic(&blob_path, &blob) {
                tracing::warn!(path = %blob_path.display(), error = %e, "could not cache plugin blob");
            }
            fetched = Some(blob);
        }

        let t = Instant::now();
        let runtime = self.runtime.clone();
        let sha = manifest.sha256.clone();
        let world = manifest.world;
        let m2 = manifest.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            runtime.load(&sha, world, move || {
                if let Some(b) = fetched {
                    return Ok(b);
                }
                // Cached blobs are checked again: the disk is not the signer.
                let b = std::fs::read(&blob_path)?;
                check_blob(&m2, &b).map_err(anyhow::Error::msg)?;
                Ok(b)
            })
        })
        .await;
        let (plugin, from_cache) = match loaded {
            Ok(Ok(p)) => p,
            Ok(Err(f)) => {
                if f.kind == FailureKind::AgentError {
                    // The cached blob was bad: drop it so the next attempt fetches again.
                    let _ = std::fs::remove_file(
                        self.blob_dir.join(format!("{}.wasm", manifest.sha256)),
                    );
                }
                return refuse(f.kind, f.message, &name, version);
            }
            Err(e) => {
                return refuse(
                    FailureKind::AgentError,
                    format!("plugin load task failed: {e}"),
                    &name,
                    version,
                );
            }
        };
        timings.load_ms = t.elapsed().as_millis() as u64;
        timings.compile_cached = from_cache;

        let grant = Grant {
            capabilities,
            limits: self.config.clamp(env.limits),
        };
        let outcome = self
            .runtime
            .run(&plugin, &me, &env.job_id, &name, &env.input, &grant)
            .await;
        timings.run_ms = outcome.run_time.as_millis() as u64;
        match outcome.output {
            Ok(v) => finish(
                ResultStatus::Succeeded,
                None,
                Some(v),
                outcome.stdout,
                outcome.stderr,
                timings,
                &name,
                version,
            ),
            Err(f) => finish(
                ResultStatus::Failed,
                Some(f),
                None,
                outcome.stdout,
                outcome.stderr,
                timings,
                &name,
                version,
            ),
        }
    }
}

/// Checks a blob against its manifest's length and digest.
pub fn check_blob(manifest: &Manifest, blob: &[u8]) -> Result<(), String> {
    if blob.len() as u64 != manifest.length {
        return Err(format!(
            "plugin blob is {} bytes but its manifest says {}; refused",
            blob.len(),
            manifest.length
        ));
    }
    let actual = sha256_hex(blob);
    if actual != manifest.sha256 {
        return Err(format!(
            "plugin blob sha256 {actual} does not match its manifest's {}; refused",
            manifest.sha256
        ));
    }
    Ok(())
}
