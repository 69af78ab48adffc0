//! Jobs: from a job envelope, or a run the agent scheduled itself, to a signed result in
//! the outbox.
//!
//! - [`admission`]: whether an envelope may run at all: signature, address, freshness,
//!   replay, copies already in hand. Every refusal becomes a result with a `rejected`
//!   status and a reason, logged and sent to the control plane.
//! - [`run`]: the one run path, for admitted envelopes and local runs alike: the
//!   running marker, cancellation, live output, then [`install`] and the sandbox, then
//!   the result.
//! - [`install`]: the plugin: manifest signatures, rollback, policy, expiry, size,
//!   [`fetch`], blob check, load.
//! - [`report`]: results signed into the outbox, and progress reports.
//! - [`recovery`]: running markers, and jobs an agent stop interrupted.
//!
//! Nothing a job carries can stop the agent.

mod admission;
pub mod fetch;
mod install;
mod recovery;
mod report;
mod run;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use drover_protocol::durable;
use drover_protocol::job::{CancelRequest, JobResult, Limits, Parameter};
use drover_protocol::link::LinkHandle;
use drover_protocol::manifest::Manifest;
use drover_protocol::now_ms;
use drover_protocol::signed::Signed;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument as _;

use self::admission::{Admission, NotRun};
use self::fetch::Fetcher;
use self::recovery::Markers;
use self::run::Running;
use crate::config::Config;
use crate::durable::outbox::Outbox;
use crate::durable::state::State;
use crate::identity::Identity;
use crate::sandbox::Sandbox;

/// Counters, for logs and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs that ran (successfully or not).
    pub ran: AtomicU64,
    /// Jobs refused before running.
    pub refused: AtomicU64,
    /// Jobs dropped because the queue was full.
    pub dropped_busy: AtomicU64,
    /// Results the outbox could not store (sent once without retry).
    pub unstored: AtomicU64,
    /// Jobs stopped by a cancel request.
    pub cancelled: AtomicU64,
    /// Bytes of live output not forwarded: over the output cap, or a full channel.
    pub live_dropped: AtomicU64,
    /// Cancel requests forgotten because too many were waiting for their job.
    pub cancels_forgotten: AtomicU64,
    /// Refusals of envelopes that could not be authenticated: sent once, not kept.
    pub unauthenticated_refusals: AtomicU64,
    /// Copies of envelopes already in hand, ignored (see [`admission`]).
    pub duplicates: AtomicU64,
    /// Result acks refused: not signed by a control-plane key, for another agent, or
    /// naming no result in the outbox. The result stays and is sent again.
    pub acks_refused: AtomicU64,
}

/// Where a job came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// A job envelope signed by a control-plane key, admitted by [`admission`].
    /// Followers may watch it: it reports progress and live output.
    Envelope {
        /// Whether the control plane sent this copy again (after a reconnect).
        resent: bool,
    },
    /// A run this agent scheduled itself, such as an association run while offline.
    Local {
        /// The schedule that started it.
        schedule: String,
    },
}

/// A job the run path takes, whatever its provenance.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job.
    pub id: String,
    /// The attempt.
    pub attempt: u32,
    /// The plugin to run, with its publishers' signatures: checked like any other.
    pub plugin: Signed<Manifest>,
    /// The plugin's input.
    pub input: serde_json::Value,
    /// Named parameters; secret ones are opened just before the run.
    pub parameters: BTreeMap<String, Parameter>,
    /// Limits, clamped to this agent's maxima before the run.
    pub limits: Limits,
    /// Where it came from.
    pub provenance: Provenance,
}

/// A run the agent scheduled itself (State Manager associations run while offline):
/// the same checks, sandbox, limits, recovery and outbox as a job from the control
/// plane, without an envelope.
#[derive(Debug, Clone)]
pub struct LocalJob {
    /// A job id of the scheduler's making, unique per run.
    pub job_id: String,
    /// The plugin, as its publishers signed it.
    pub plugin: Signed<Manifest>,
    /// The plugin's input.
    pub input: serde_json::Value,
    /// Parameters, in plain text (a local schedule has no sealed secrets).
    pub parameters: BTreeMap<String, String>,
    /// Limits.
    pub limits: Limits,
    /// The schedule that started it, for the logs.
    pub schedule: String,
}

impl From<LocalJob> for Job {
    fn from(j: LocalJob) -> Job {
        let LocalJob {
            job_id,
            plugin,
            input,
            parameters,
            limits,
            schedule,
        } = j;
        Job {
            id: job_id,
            attempt: 1,
            plugin,
            input,
            parameters: parameters
                .into_iter()
                .map(|(k, value)| (k, Parameter::Plain { value }))
                .collect(),
            limits,
            provenance: Provenance::Local { schedule },
        }
    }
}

/// The jobs of one agent: what admits, runs and reports them.
pub struct Jobs {
    config: Arc<Config>,
    sandbox: Arc<Sandbox>,
    link: LinkHandle,
    fetcher: Fetcher,
    state: Arc<State>,
    identity: Arc<Identity>,
    outbox: Arc<Outbox>,
    admission: Admission,
    blob_dir: PathBuf,
    markers: Markers,
    slots: Semaphore,
    /// Running jobs and cancel requests, under one lock so a cancel cannot fall
    /// between them.
    running: Mutex<Running>,
    /// Progress reports not sent because the connection's queue was full.
    progress_dropped: Arc<AtomicU64>,
    /// Counters.
    pub stats: Stats,
}

impl Jobs {
    /// Creates the pipeline, in `config.data_dir`.
    pub fn new(
        config: Arc<Config>,
        sandbox: Arc<Sandbox>,
        link: LinkHandle,
        fetcher: Fetcher,
        state: Arc<State>,
        identity: Arc<Identity>,
        outbox: Arc<Outbox>,
    ) -> anyhow::Result<Arc<Jobs>> {
        let blob_dir = config.data_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir)?;
        for e in std::fs::read_dir(&blob_dir)?.flatten() {
            // A blob written when the agent stopped: fetched again when needed.
            if durable::is_temp(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let markers = Markers::open(&config.data_dir.join("running"))?;
        Ok(Arc::new(Jobs {
            slots: Semaphore::new(config.max_concurrent_jobs),
            admission: Admission::new(&config.id, state.clone(), outbox.clone()),
            config,
            sandbox,
            link,
            fetcher,
            state,
            identity,
            outbox,
            blob_dir,
            markers,
            running: Mutex::default(),
            progress_dropped: Arc::default(),
            stats: Stats::default(),
        }))
    }

    /// Takes envelopes off `rx` and runs them, at most `max_concurrent_jobs` at once.
    pub async fn serve(self: Arc<Self>, mut rx: mpsc::Receiver<Bytes>) {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(payload) = rx.recv().await {
            // Waiting here for a free slot backs up the bounded queue behind it.
            let Ok(permit) = self.slots.acquire().await else {
                break;
            };
            permit.forget();
            let me = self.clone();
            tasks.spawn(
                async move {
                    me.handle(payload).await;
                    me.slots.add_permits(1);
                }
                .in_current_span(),
            );
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Handles one envelope to the end: admits it, runs it, reports it.
    pub async fn handle(&self, payload: Bytes) {
        let started = Instant::now();
        let started_at_ms = now_ms();
        match self.admission.check(&payload, started_at_ms) {
            Err(NotRun::Duplicate { job_id, attempt }) => {
                let n = self.stats.duplicates.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(job.id = %job_id, attempt, duplicates_total = n, "another copy of a job in hand; ignored");
            }
            Err(NotRun::Refused(refusal)) => self.report(&refusal).await,
            Ok(job) => {
                let key = (job.id.clone(), job.attempt);
                self.run(job, started, started_at_ms).await;
                // Its result is in the outbox now, which answers any further copy.
                self.admission.release(&key);
            }
        }
    }

    /// Runs a job the agent scheduled itself, through the same checks, sandbox, limits,
    /// running marker and outbox as a job from the control plane. Returns its result,
    /// which is also in the outbox. It waits for one of the `max_concurrent_jobs` slots
    /// that envelopes share.
    pub async fn run_local(&self, job: LocalJob) -> JobResult {
        let (started, started_at_ms) = (Instant::now(), now_ms());
        // The semaphore is never closed; without a slot the job still runs.
        let _slot = self.slots.acquire().await.ok();
        self.run(job.into(), started, started_at_ms).await
    }

    /// Handles a cancel request from the control plane: a running job is stopped, with
    /// every program it started; a job not started yet never starts.
    pub fn cancel(&self, payload: &[u8], now_ms: u64) {
        let keyset = self.state.keyset();
        let req = serde_json::from_slice::<Signed<CancelRequest>>(payload)
            .map_err(|e| format!("not valid JSON: {e}"))
            .and_then(|s| s.verify(&keyset.control_plane).map_err(|e| e.to_string()));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cancel request refused: {e}");
                return;
            }
        };
        if req.agent_id != self.config.id {
            tracing::warn!(job.id = %req.job_id, to = %req.agent_id, "cancel request for another agent refused");
            return;
        }
        if req.expires_at_ms < now_ms {
            tracing::warn!(job.id = %req.job_id, expired_ms_ago = now_ms - req.expires_at_ms, "expired cancel request refused");
            return;
        }
        match self
            .lock_running()
            .cancel(&req.job_id, req.attempt, now_ms, req.expires_at_ms)
        {
            run::Cancelled::Running => tracing::info!(job.id = %req.job_id, "cancelling job"),
            run::Cancelled::Remembered => {
                tracing::info!(job.id = %req.job_id, "cancel request for a job not running; it will not start")
            }
            run::Cancelled::Forgotten => {
                let n = self.stats.cancels_forgotten.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(job.id = %req.job_id, forgotten_total = n, "too many cancel requests waiting; this one is not kept");
            }
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
