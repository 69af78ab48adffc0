//! From a job envelope to a published result: verify, fetch, check, load, run, report.
//!
//! Every refusal becomes a result with a `Rejected` status and a reason, logged and sent
//! to the control plane; nothing a job carries can stop the agent.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drover_protocol::job::{
    CancelRequest, Failure, FailureKind, JobEnvelope, JobResult, Parameter, Progress,
    ProgressEvent, ResultStatus, StreamName,
};
use drover_protocol::manifest::{Manifest, sha256_hex};
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Up};
use drover_protocol::{link::LinkHandle, now_ms, now_secs};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::Config;
use crate::exec::{LiveChunk, LiveSink};
use crate::fetch::Fetcher;
use crate::identity::Identity;
use crate::outbox::Outbox;
use crate::runtime::{Grant, RunOutcome, RunRequest, Runtime};
use crate::state::{EnvelopeRefusal, State};

/// How far the agent's clock may be behind the control plane's.
const CLOCK_SKEW_MS: u64 = 60_000;

/// Pieces of live output waiting for the forwarder before new ones are dropped.
const LIVE_CAPACITY: usize = 256;
/// Largest piece of live output in one progress message.
const LIVE_BATCH: usize = 32 << 10;
/// Largest text in one live-output message, so that followers' backlogs stay small.
const LIVE_PIECE: usize = 16 << 10;
/// How long live output gathers before it goes out.
const LIVE_LINGER: Duration = Duration::from_millis(50);
/// How long a job runs before its `Started` report goes out (sooner if it has output).
/// A job done before that is reported by its result alone: for the many short jobs of a
/// fleet-wide command, that halves the messages the control plane must check and store.
pub const STARTED_AFTER: Duration = Duration::from_millis(200);
/// How long cancel requests for jobs not (yet) seen are remembered.
const CANCEL_MEMORY_MS: u64 = 3_600_000;
/// Most cancel requests remembered for jobs not (yet) seen.
const CANCEL_MEMORY_MAX: usize = 10_000;

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
    /// Copies of envelopes already in hand, ignored (see [`NotRun::Duplicate`]).
    pub duplicates: AtomicU64,
}

/// Jobs running now, and cancel requests for jobs that are not (yet).
#[derive(Default)]
struct Jobs {
    /// By job id, with what stops it.
    running: HashMap<String, CancellationToken>,
    /// By job id, with when the request came.
    cancelled: HashMap<String, u64>,
    /// (job id, attempt) of envelopes accepted by this process whose result is not in
    /// the outbox yet. Claimed before the seen set is asked, so that of two copies of
    /// one envelope arriving together exactly one runs and the other is a duplicate.
    in_hand: HashSet<(String, u32)>,
}

/// Why an envelope is not run.
enum NotRun {
    /// Refused: the result says why, and goes to the control plane.
    Refused(Box<JobResult>),
    /// Another copy of an envelope this agent has already taken: one in hand (running,
    /// or its result waiting in the outbox), or one the control plane marked as sent
    /// again (it does that for unanswered envelopes when an agent reconnects). Ignored
    /// without a report: the one result answers both. A replay of an original envelope
    /// the agent is done with is still refused and reported.
    Duplicate { job_id: String, attempt: u32 },
}

impl From<Box<JobResult>> for NotRun {
    fn from(r: Box<JobResult>) -> NotRun {
        NotRun::Refused(r)
    }
}

/// Shared state of the job pipeline.
pub struct Executor {
    config: Arc<Config>,
    runtime: Arc<Runtime>,
    link: LinkHandle,
    fetcher: Fetcher,
    state: Arc<State>,
    identity: Arc<Identity>,
    outbox: Arc<Outbox>,
    blob_dir: PathBuf,
    running_dir: PathBuf,
    slots: Semaphore,
    /// Running jobs and cancel requests, under one lock so a cancel cannot fall
    /// between them.
    jobs: Mutex<Jobs>,
    /// Progress reports not sent because the connection's queue was full.
    progress_dropped: Arc<AtomicU64>,
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
        state: Arc<State>,
        identity: Arc<Identity>,
        outbox: Arc<Outbox>,
    ) -> anyhow::Result<Arc<Executor>> {
        let blob_dir = config.data_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir)?;
        let running_dir = config.data_dir.join("running");
        std::fs::create_dir_all(&running_dir)?;
        Ok(Arc::new(Executor {
            slots: Semaphore::new(config.max_concurrent_jobs),
            config,
            runtime,
            link,
            fetcher,
            state,
            identity,
            outbox,
            blob_dir,
            running_dir,
            jobs: Mutex::new(Jobs::default()),
            progress_dropped: Arc::default(),
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
        let checked = match self.check_envelope(&payload) {
            Err(NotRun::Duplicate { job_id, attempt }) => {
                let n = self.stats.duplicates.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(job.id = %job_id, attempt, duplicates_total = n, "another copy of a job in hand; ignored");
                return;
            }
            Err(NotRun::Refused(refusal)) => Err(refusal),
            Ok(env) => Ok(env),
        };
        let in_hand = checked.as_ref().ok().map(|e| (e.job_id.clone(), e.attempt));
        let result = match checked {
            Err(refusal) => *refusal,
            Ok(env) => {
                let span = tracing::info_span!("job", job.id = %env.job_id, attempt = env.attempt);
                let mut job = JobResult::refused(
                    &env.job_id,
                    &self.config.id,
                    env.attempt,
                    FailureKind::AgentError,
                    String::new(),
                );
                job.started_at_ms = started_at_ms;
                // Written before anything runs, removed once the result is in the outbox:
                // if the agent dies in between, the next start reports it interrupted.
                let marker = self.marker(&env.job_id, env.attempt);
                let claimed = env
                    .plugin
                    .unverified()
                    .map(|m| (m.name, m.version))
                    .unwrap_or_default();
                if let Err(e) = crate::runtime::write_atomic(
                    &marker,
                    &serde_json::to_vec(&claimed).unwrap_or_default(),
                ) {
                    tracing::warn!(job.id = %env.job_id, error = %e, "cannot record the running job; a crash now would go unreported");
                }
                let seq = Arc::new(AtomicU64::new(0));
                let stop = CancellationToken::new();
                let already = {
                    let mut jobs = self.lock_jobs();
                    let already = jobs.cancelled.remove(&env.job_id).is_some();
                    if already {
                        stop.cancel();
                    } else {
                        jobs.running.insert(env.job_id.clone(), stop.clone());
                    }
                    already
                };
                let (live, live_rx) = LiveSink::new(LIVE_CAPACITY);
                let partial = live.partial();
                let forwarder = tokio::spawn(forward_live(
                    self.reporter(),
                    env.clone(),
                    seq,
                    live_rx,
                    self.config.clamp(env.limits).output_bytes,
                ));
                let outcome = tokio::select! {
                    // Dropping the run kills every program it started, whole process
                    // groups, before the result goes out.
                    _ = stop.cancelled() => Err(Failure {
                        kind: FailureKind::Cancelled,
                        message: if already {
                            "cancelled by the operator before it started".into()
                        } else {
                            "cancelled by the operator; the programs it started were killed".into()
                        },
                        retryable: false,
                    }),
                    r = self.execute(&env, &mut job, live).instrument(span) => r,
                };
                self.lock_jobs().running.remove(&env.job_id);
                if matches!(&outcome, Err(f) if f.kind == FailureKind::Cancelled) {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    job.status = ResultStatus::Failed;
                }
                // Live output goes out before the result, so a follower sees it in order.
                let abort = forwarder.abort_handle();
                match tokio::time::timeout(Duration::from_secs(5), forwarder).await {
                    Ok(Ok(dropped)) => {
                        if dropped > 0 {
                            self.stats
                                .live_dropped
                                .fetch_add(dropped, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        abort.abort();
                        tracing::warn!(job.id = %env.job_id, "live output did not finish in time; the rest is dropped");
                    }
                }
                match outcome {
                    Err(failure) => {
                        job.failure = Some(failure);
                        job.output = partial_output(&partial);
                    }
                    Ok(outcome) => {
                        job.timings.run_ms = outcome.run_time.as_millis() as u64;
                        job.stdout = outcome.stdout;
                        job.stderr = outcome.stderr;
                        match outcome.output {
                            Ok(v) => {
                                job.status = ResultStatus::Succeeded;
                                job.failure = None;
                                job.output = Some(v);
                            }
                            Err(f) => {
                                job.status = ResultStatus::Failed;
                                job.failure = Some(f);
                                job.output = partial_output(&partial);
                            }
                        }
                    }
                }
                job.duration_ms = started.elapsed().as_millis() as u64;
                job
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
        let _ = std::fs::remove_file(self.marker(&result.job_id, result.attempt));
        if let Some(key) = in_hand {
            self.lock_jobs().in_hand.remove(&key);
        }
    }

    /// Signs a result and puts it in the outbox, which publishes it until the control
    /// plane acknowledges it. If the disk refuses it, it is still published once, and
    /// the failure is logged and counted.
    async fn publish(&self, result: &JobResult) {
        // Signed with the agent's own key: the broker cannot forge or alter results.
        let signed = Signed::sign(result, &self.identity.signing);
        let body = match serde_json::to_vec(&signed) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "could not encode result");
                return;
            }
        };
        // A refusal of an envelope that could not be authenticated (or was seen before)
        // speaks for no job this agent took on: anyone on the path can provoke one, with
        // any job id. Sent once for the record, it never enters the outbox, where it
        // would share the (job, attempt) key of a real result.
        let unauthenticated = result.status == ResultStatus::Rejected
            && result.failure.as_ref().is_some_and(|f| {
                matches!(
                    f.kind,
                    FailureKind::BadEnvelope | FailureKind::Misaddressed | FailureKind::Replayed
                )
            });
        if unauthenticated {
            self.stats
                .unauthenticated_refusals
                .fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self
                .link
                .publish(topics::up(&self.config.id, Up::Result), body, false)
                .await
            {
                tracing::warn!(job.id = %result.job_id, error = %e, "could not publish refusal");
            }
            return;
        }
        match self.outbox.push(&result.job_id, result.attempt, &body) {
            Ok(()) => {}
            Err(e) => {
                let n = self.stats.unstored.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    job.id = %result.job_id,
                    unstored_total = n,
                    "result could not be stored durably, so it is sent once without a retry: {e:#}"
                );
                if let Err(e) = self
                    .link
                    .publish(topics::up(&self.config.id, Up::Result), body, false)
                    .await
                {
                    tracing::error!(job.id = %result.job_id, error = %e, "could not publish result");
                }
            }
        }
    }

    fn marker(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.running_dir
            .join(format!("{}.{attempt}", hex::encode(job_id)))
    }

    /// Reports every job that was running when the agent last stopped as interrupted.
    /// Such jobs are never run again: the seen-envelope log already refuses them.
    pub async fn recover_interrupted(&self) {
        let Ok(dir) = std::fs::read_dir(&self.running_dir) else {
            return;
        };
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let parsed = name.rsplit_once('.').and_then(|(id, a)| {
                Some((
                    String::from_utf8(hex::decode(id).ok()?).ok()?,
                    a.parse::<u32>().ok()?,
                ))
            });
            let Some((job_id, attempt)) = parsed else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            if self.outbox.holds(&job_id, attempt) {
                // It finished and its result is safe: the agent died just after.
                tracing::info!(job.id = %job_id, attempt, "job finished before the agent stopped; its result is in the outbox");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let plugin: (String, u64) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let mut r = JobResult::refused(
                &job_id,
                &self.config.id,
                attempt,
                FailureKind::Interrupted,
                "the agent stopped while this job was running (a crash or a kill); it was not run again"
                    .into(),
            );
            r.status = ResultStatus::Failed;
            (r.plugin, r.plugin_version) = plugin;
            tracing::warn!(job.id = %job_id, attempt, "job was interrupted by an agent stop");
            self.publish(&r).await;
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Answers a job that found the queue full: counted, logged, and reported as a
    /// retryable refusal so the operator is not left waiting.
    pub async fn refuse_busy(&self, payload: &[u8]) {
        let n = self.stats.dropped_busy.fetch_add(1, Ordering::Relaxed) + 1;
        // Only an envelope the control plane signed gets a durable answer; anything else
        // is refused like any unverifiable envelope.
        let env = match self.check_signature(payload) {
            Ok(env) => env,
            Err(refusal) => {
                tracing::warn!(
                    dropped_total = n,
                    "job queue full, and the envelope does not verify"
                );
                self.publish(&refusal).await;
                return;
            }
        };
        if self.state.was_accepted(&env.job_id, env.attempt) {
            // A redelivery of a job already taken on: its own result will answer.
            tracing::info!(job.id = %env.job_id, "job queue full; a repeat of an accepted job dropped");
            return;
        }
        if env.resent {
            // A copy the control plane sent again; its original may be waiting in the
            // queue, and a refusal now would answer for it. If not, the next hello
            // brings another copy.
            tracing::warn!(job.id = %env.job_id, dropped_total = n, "job queue full; a copy sent again dropped");
            return;
        }
        tracing::error!(job.id = %env.job_id, dropped_total = n, "job queue full; job refused");
        let mut r = JobResult::refused(
            &env.job_id,
            &self.config.id,
            env.attempt,
            FailureKind::AgentError,
            format!(
                "agent is busy: its queue of {} jobs is full",
                self.config.job_queue
            ),
        );
        if let Some(f) = r.failure.as_mut() {
            f.retryable = true;
        }
        self.publish(&r).await;
    }

    /// Parses and verifies an envelope's signature, nothing more.
    fn check_signature(&self, payload: &[u8]) -> Result<JobEnvelope, Box<JobResult>> {
        let me = &self.config.id;
        let signed: Signed<JobEnvelope> = serde_json::from_slice(payload).map_err(|e| {
            Box::new(JobResult::refused(
                "",
                me,
                0,
                FailureKind::BadEnvelope,
                format!("job envelope is not valid JSON: {e}"),
            ))
        })?;
        // Until the signature checks out, the envelope's own claims are only used to say
        // which job a refusal is about.
        let claimed = signed.unverified().ok();
        signed
            .verify(&self.state.keyset().control_plane)
            .map_err(|e| {
                let (id, attempt) = claimed.map(|c| (c.job_id, c.attempt)).unwrap_or_default();
                Box::new(JobResult::refused(
                    &id,
                    me,
                    attempt,
                    FailureKind::BadEnvelope,
                    format!("job envelope refused: {e}"),
                ))
            })
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles a cancel request from the control plane: a running job is stopped, with
    /// every program it started; a job not started yet never starts.
    pub fn cancel(&self, payload: &[u8]) {
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
        let now = now_ms();
        let mut jobs = self.lock_jobs();
        if let Some(stop) = jobs.running.get(&req.job_id) {
            tracing::info!(job.id = %req.job_id, "cancelling job");
            stop.cancel();
            return;
        }
        jobs.cancelled
            .retain(|_, at| now.saturating_sub(*at) < CANCEL_MEMORY_MS);
        if jobs.cancelled.len() >= CANCEL_MEMORY_MAX {
            let n = self.stats.cancels_forgotten.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(job.id = %req.job_id, forgotten_total = n, "too many cancel requests waiting; this one is not kept");
            return;
        }
        tracing::info!(job.id = %req.job_id, "cancel request for a job not running; it will not start");
        jobs.cancelled.insert(req.job_id, now);
    }

    /// Publishes a signed progress report. Best effort: the result is what counts.
    fn reporter(&self) -> Reporter {
        Reporter {
            link: self.link.clone(),
            identity: self.identity.clone(),
            agent_id: self.config.id.clone(),
            dropped: self.progress_dropped.clone(),
        }
    }

    /// Checks the envelope: encoding, signature, address, freshness, replay.
    fn check_envelope(&self, payload: &[u8]) -> Result<JobEnvelope, NotRun> {
        let me = &self.config.id;
        let env = self.check_signature(payload)?;
        let refuse = |kind, message: String| {
            NotRun::Refused(Box::new(JobResult::refused(
                &env.job_id,
                me,
                env.attempt,
                kind,
                message,
            )))
        };
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
        let key = (env.job_id.clone(), env.attempt);
        let duplicate = || NotRun::Duplicate {
            job_id: env.job_id.clone(),
            attempt: env.attempt,
        };
        if !self.lock_jobs().in_hand.insert(key.clone()) {
            return Err(duplicate());
        }
        // Remembered on disk before anything runs, so a restart cannot reopen the door.
        let accepted = self.state.accept_envelope(
            &env.job_id,
            env.attempt,
            env.expires_at_ms,
            now,
            CLOCK_SKEW_MS,
        );
        if accepted.is_err() {
            self.lock_jobs().in_hand.remove(&key);
        }
        match accepted {
            Ok(()) => Ok(env),
            // A copy the control plane sent again, or one whose answer is still in the
            // outbox (which sends it again until acknowledged).
            Err(EnvelopeRefusal::Replayed)
                if env.resent || self.outbox.holds(&env.job_id, env.attempt) =>
            {
                Err(duplicate())
            }
            Err(EnvelopeRefusal::Replayed) => Err(refuse(
                FailureKind::Replayed,
                "job envelope was already received once; replay refused".into(),
            )),
            Err(EnvelopeRefusal::Unrecordable(e)) => Err(refuse(
                FailureKind::AgentError,
                format!("cannot record the job for replay protection, so it is refused: {e}"),
            )),
        }
    }

    /// Verifies, fetches, loads and runs the plugin. Fills `job` (the plugin's name and
    /// version, timings) as it learns them; an `Err` means nothing ran.
    async fn execute(
        &self,
        env: &JobEnvelope,
        job: &mut JobResult,
        live: LiveSink,
    ) -> Result<RunOutcome, Failure> {
        let refuse = |kind, message: String| Failure {
            kind,
            message,
            retryable: false,
        };
        // Until the manifest verifies, its claims only label the refusal.
        if let Ok(m) = env.plugin.unverified() {
            job.plugin = m.name;
            job.plugin_version = m.version;
        }
        let keyset = self.state.keyset();
        let manifest: Manifest = env
            .plugin
            .verify_threshold_memo(
                &keyset.publishers,
                keyset.publisher_threshold as usize,
                self.runtime.manifest_signatures(),
            )
            .map_err(|e| {
                refuse(
                    FailureKind::UntrustedPlugin,
                    format!("plugin manifest refused: {e}"),
                )
            })?;
        manifest.validate().map_err(|e| {
            refuse(
                FailureKind::UntrustedPlugin,
                format!("plugin manifest invalid: {e}"),
            )
        })?;
        self.state
            .check_plugin(&manifest.name, manifest.version, &manifest.sha256)
            .map_err(|m| refuse(FailureKind::UntrustedPlugin, m))?;
        let capabilities = self
            .config
            .policy
            .grant(&manifest.capabilities)
            .map_err(|missing| {
                refuse(
                    FailureKind::PolicyDenied,
                    format!(
                        "plugin asks for capabilities this agent's policy does not allow: {}",
                        missing.join(", ")
                    ),
                )
            })?;
        // Expiry stops new installs, never a plugin already installed.
        let installed = self
            .state
            .is_installed(&manifest.name, manifest.version, &manifest.sha256);
        if !installed && now_secs() > manifest.expires_at {
            return Err(refuse(
                FailureKind::ExpiredPlugin,
                format!(
                    "plugin manifest expired {} s ago; it cannot be installed",
                    now_secs() - manifest.expires_at
                ),
            ));
        }
        if manifest.length > self.config.max_plugin_bytes {
            return Err(refuse(
                FailureKind::PolicyDenied,
                format!(
                    "plugin is {} bytes, over this agent's {} byte limit",
                    manifest.length, self.config.max_plugin_bytes
                ),
            ));
        }

        // The blob: from the cache, else fetched and checked.
        let blob_path = self.blob_dir.join(format!("{}.wasm", manifest.sha256));
        let mut fetched: Option<Vec<u8>> = None;
        if !self.runtime.is_cached(&manifest.sha256) && !blob_path.exists() {
            let t = Instant::now();
            let blob = self
                .fetcher
                .fetch(
                    &self.link,
                    &self.config.id,
                    &manifest.sha256,
                    manifest.length,
                    self.config.chunk_size,
                )
                .await
                .map_err(|e| refuse(FailureKind::FetchFailed, e.to_string()))?;
            job.timings.fetch_ms = t.elapsed().as_millis() as u64;
            check_blob(&manifest, &blob).map_err(|m| refuse(FailureKind::BlobMismatch, m))?;
            if let Err(e) = crate::runtime::write_atomic(&blob_path, &blob) {
                tracing::warn!(path = %blob_path.display(), error = %e, "could not cache plugin blob");
            }
            fetched = Some(blob);
        }

        // Compiling is CPU-bound: keep it off the async workers. A plugin already in
        // memory needs neither the disk nor a blocking thread.
        let t = Instant::now();
        let runtime = self.runtime.clone();
        let m = manifest.clone();
        let path = blob_path.clone();
        let loaded = if let Some(plugin) = self.runtime.loaded(&manifest.sha256) {
            Ok((plugin, true))
        } else {
            tokio::task::spawn_blocking(move || {
                let (sha, world) = (m.sha256.clone(), m.world);
                runtime.load(&sha, world, move || {
                    if let Some(b) = fetched {
                        return Ok(b);
                    }
                    // Cached blobs are checked again: the disk is not the signer.
                    let b = std::fs::read(&path)?;
                    check_blob(&m, &b).map_err(anyhow::Error::msg)?;
                    Ok(b)
                })
            })
            .await
            .map_err(|e| {
                refuse(
                    FailureKind::AgentError,
                    format!("plugin load task failed: {e}"),
                )
            })?
        };
        let (plugin, from_cache) = loaded.inspect_err(|f| {
            if f.kind == FailureKind::AgentError {
                // A bad cached blob: drop it so the next attempt fetches afresh.
                let _ = std::fs::remove_file(&blob_path);
            }
        })?;
        if let Err(e) = self
            .state
            .record_plugin(&manifest.name, manifest.version, &manifest.sha256)
        {
            return Err(refuse(
                FailureKind::AgentError,
                format!("cannot record the plugin's version, so it is not run: {e:#}"),
            ));
        }
        job.timings.load_ms = t.elapsed().as_millis() as u64;
        job.timings.compile_cached = from_cache;

        // Secrets are opened here, inside the agent, and handed only to the run.
        let mut parameters = std::collections::BTreeMap::new();
        for (name, p) in &env.parameters {
            let value = match p {
                Parameter::Plain { value } => value.clone(),
                Parameter::Secret { sealed } => {
                    let aad = drover_protocol::secret::parameter_aad(&env.job_id, name);
                    let bytes = self.identity.sealing.open(sealed, &aad).map_err(|e| {
                        refuse(
                            FailureKind::BadEnvelope,
                            format!("secret parameter {name:?}: {e}"),
                        )
                    })?;
                    String::from_utf8(bytes).map_err(|_| {
                        refuse(
                            FailureKind::BadEnvelope,
                            format!("secret parameter {name:?} is not UTF-8"),
                        )
                    })?
                }
            };
            parameters.insert(name.clone(), value);
        }
        let grant = Grant {
            capabilities,
            limits: self.config.clamp(env.limits),
            run_as: self.config.policy.run_as.clone(),
        };
        let req = RunRequest {
            agent_id: &self.config.id,
            job_id: &env.job_id,
            plugin_name: &manifest.name,
            input: &env.input,
            parameters: &parameters,
            grant: &grant,
            live: Some(live),
        };
        Ok(self.runtime.run(&plugin, &req).await)
    }
}

/// Sends signed progress reports for one agent.
struct Reporter {
    link: LinkHandle,
    identity: Arc<Identity>,
    agent_id: String,
    dropped: Arc<AtomicU64>,
}

impl Reporter {
    fn send(&self, env: &JobEnvelope, seq: &AtomicU64, event: ProgressEvent) {
        let p = Progress {
            job_id: env.job_id.clone(),
            agent_id: self.agent_id.clone(),
            attempt: env.attempt,
            seq: seq.fetch_add(1, Ordering::Relaxed),
            at_ms: now_ms(),
            event,
        };
        let body = serde_json::to_vec(&Signed::sign(&p, &self.identity.signing))
            .expect("progress reports serialise");
        // Never waits: progress is a view, and must not hold up jobs or results.
        if let Err(e) = self
            .link
            .try_publish(topics::up(&self.agent_id, Up::Progress), body)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(job.id = %env.job_id, error = %e, "progress not sent");
        }
    }
}

/// What a program stopped before its end (by the job's deadline, a cancel, or its own
/// timeout) had written, as a command runner's output marked `partial`, without an exit
/// code; None when no program was cut short or it wrote nothing.
fn partial_output(partial: &crate::exec::Partial) -> Option<serde_json::Value> {
    let [stdout, stderr] = partial.take();
    if stdout.total == 0 && stderr.total == 0 {
        return None;
    }
    let stream = |c: &crate::exec::Captured| {
        serde_json::json!({
            "text": String::from_utf8_lossy(&c.kept),
            "total_bytes": c.total,
            "truncated": c.total > c.kept.len() as u64,
        })
    };
    Some(serde_json::json!({
        "partial": true,
        "stdout": stream(&stdout),
        "stderr": stream(&stderr),
    }))
}

/// Reports the job started, once it has run for [`STARTED_AFTER`] or has output, then
/// sends live output as progress reports, gathered into pieces of up to [`LIVE_BATCH`]
/// bytes, until the run ends. Forwards at most `cap` bytes per stream; returns how many
/// bytes it dropped.
async fn forward_live(
    reporter: Reporter,
    env: JobEnvelope,
    seq: Arc<AtomicU64>,
    mut rx: mpsc::Receiver<LiveChunk>,
    cap: u64,
) -> u64 {
    let mut early = match tokio::time::timeout(STARTED_AFTER, rx.recv()).await {
        // Over already: its result says all.
        Ok(None) => return 0,
        Ok(Some(chunk)) => Some(chunk),
        Err(_) => None,
    };
    reporter.send(&env, &seq, ProgressEvent::Started);
    let mut sent = [0u64; 2];
    let mut dropped = 0u64;
    let mut tails: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut closed = false;
    while !closed {
        let first = match early.take() {
            Some(chunk) => chunk,
            None => match rx.recv().await {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let mut batch = vec![first];
        let flush_at = tokio::time::Instant::now() + LIVE_LINGER;
        while batch.iter().map(|c| c.data.len()).sum::<usize>() < LIVE_BATCH {
            match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(c)) => batch.push(c),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        for (i, stream) in [StreamName::Stdout, StreamName::Stderr]
            .into_iter()
            .enumerate()
        {
            let mut bytes = std::mem::take(&mut tails[i]);
            for c in batch.iter().filter(|c| c.stream == stream) {
                bytes.extend_from_slice(&c.data);
            }
            if bytes.is_empty() {
                continue;
            }
            let room = cap.saturating_sub(sent[i]) as usize;
            if bytes.len() > room {
                dropped += (bytes.len() - room) as u64;
                bytes.truncate(room);
            }
            // A piece that ends inside a UTF-8 sequence keeps the rest for the next one.
            if !closed
                && let Err(e) = std::str::from_utf8(&bytes)
                && e.error_len().is_none()
            {
                tails[i] = bytes.split_off(e.valid_up_to());
            }
            if bytes.is_empty() {
                continue;
            }
            sent[i] += bytes.len() as u64;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            for piece in split_text(&text, LIVE_PIECE) {
                reporter.send(
                    &env,
                    &seq,
                    ProgressEvent::Output {
                        stream,
                        text: piece.to_string(),
                    },
                );
            }
        }
    }
    dropped
}

/// Splits `s` into pieces of at most `max` bytes, on character boundaries.
fn split_text(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
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
