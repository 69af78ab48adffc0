//! The run path, the same for every job whatever its provenance: mark it running, make
//! it cancellable, install its plugin, open its secrets, run it in the sandbox with its
//! limits (forwarding live output when someone may follow it), build its result, and
//! put the result in the outbox.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use drover_protocol::job::{
    self, Failure, FailureKind, JobResult, Limits, Parameter, ResultStatus,
};
use drover_protocol::manifest::World;
use drover_protocol::worlds::command::CommandOutput;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::report::forward_live;
use super::{Job, Jobs, Provenance};
use crate::sandbox::exec::{self, LiveSink, Partial};
use crate::sandbox::{Grant, RunOutcome, RunRequest};

/// Pieces of live output waiting for the forwarder before new ones are dropped.
const LIVE_CAPACITY: usize = 256;
/// How long cancel requests for jobs not (yet) seen are remembered.
const CANCEL_MEMORY_MS: u64 = 3_600_000;
/// Most cancel requests remembered for jobs not (yet) seen.
const CANCEL_MEMORY_MAX: usize = 10_000;
/// How long the live-output forwarder may take to finish after its run.
const FORWARDER_GRACE: Duration = Duration::from_secs(5);

/// Jobs running now, and cancel requests for jobs that are not (yet), by (job, attempt):
/// a cancel request stops one attempt, never a later one.
#[derive(Default)]
pub struct Running {
    /// With what stops each.
    running: HashMap<(String, u32), CancellationToken>,
    /// With until when each request holds (Unix milliseconds).
    cancelled: HashMap<(String, u32), u64>,
}

/// What a cancel request did.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The job is running: it is being stopped.
    Running,
    /// The job is not running: it will not start.
    Remembered,
    /// Too many requests are waiting for their jobs: this one is not kept.
    Forgotten,
}

impl Running {
    /// A job starts: what stops it, and whether a cancel request already came for it.
    fn start(&mut self, job_id: &str, attempt: u32) -> (CancellationToken, bool) {
        let stop = CancellationToken::new();
        let key = (job_id.to_string(), attempt);
        let already = self.cancelled.remove(&key).is_some();
        if already {
            stop.cancel();
        } else {
            self.running.insert(key, stop.clone());
        }
        (stop, already)
    }

    fn finish(&mut self, job_id: &str, attempt: u32) {
        self.running.remove(&(job_id.to_string(), attempt));
    }

    /// A cancel request for (`job_id`, `attempt`) that holds until `until_ms` came at
    /// `now_ms`.
    pub fn cancel(&mut self, job_id: &str, attempt: u32, now_ms: u64, until_ms: u64) -> Cancelled {
        let key = (job_id.to_string(), attempt);
        if let Some(stop) = self.running.get(&key) {
            stop.cancel();
            return Cancelled::Running;
        }
        self.cancelled.retain(|_, until| *until > now_ms);
        if self.cancelled.len() >= CANCEL_MEMORY_MAX {
            return Cancelled::Forgotten;
        }
        self.cancelled
            .insert(key, until_ms.min(now_ms.saturating_add(CANCEL_MEMORY_MS)));
        Cancelled::Remembered
    }
}

impl Jobs {
    /// Runs a job to its result, which is in the outbox (or was sent once) on return.
    /// `started` is when the agent took it on.
    pub(super) async fn run(&self, job: Job, started: Instant, started_at_ms: u64) -> JobResult {
        let span = tracing::info_span!(
            "job",
            job.id = %job.id,
            attempt = job.attempt,
            plugin = tracing::field::Empty,
        );
        self.run_in_span(job, started, started_at_ms)
            .instrument(span)
            .await
    }

    async fn run_in_span(&self, job: Job, started: Instant, started_at_ms: u64) -> JobResult {
        let mut result = JobResult::refused(
            &job.id,
            &self.config.id,
            job.attempt,
            FailureKind::AgentError,
            String::new(),
        );
        result.started_at_ms = started_at_ms;
        // Until the manifest verifies, its claims only label the result.
        let claimed = job.plugin.unverified().ok();
        let world = claimed.as_ref().map(|m| m.world);
        let label = claimed.map(|m| (m.name, m.version)).unwrap_or_default();
        (result.plugin, result.plugin_version) = label.clone();
        if let Provenance::Local { schedule } = &job.provenance {
            tracing::info!(schedule = %schedule, "running a scheduled job");
        }
        // Written before anything runs, removed once the result is in the outbox: if the
        // agent dies in between, the next start reports it interrupted.
        if let Err(e) = self.markers.mark(&job.id, job.attempt, &label) {
            tracing::warn!(error = %e, "cannot record the running job; a crash now would go unreported");
        }
        let (stop, already) = self.lock_running().start(&job.id, job.attempt);
        let limits = self.config.clamp(job.limits);
        let (live, live_rx) = LiveSink::new(LIVE_CAPACITY);
        let partial = live.partial();
        // Only a job from the control plane has followers; a local run's programs still
        // leave their output in `partial` if they are cut short.
        let (live, forwarder) = match job.provenance {
            Provenance::Envelope { .. } => {
                let forwarder = forward_live(
                    self.reporter(),
                    job.id.clone(),
                    job.attempt,
                    live_rx,
                    limits.output_bytes,
                );
                (live, Some(tokio::spawn(forwarder.in_current_span())))
            }
            Provenance::Local { .. } => (live.keep_only(), None),
        };
        let cancelled = |message: &str| Failure::new(FailureKind::Cancelled, message);
        let outcome = if already {
            Err(cancelled("cancelled by the operator before it started"))
        } else {
            tokio::select! {
                // Dropping the run kills every program it started, whole process
                // groups, before the result goes out.
                _ = stop.cancelled() => Err(cancelled(
                    "cancelled by the operator; the programs it started were killed",
                )),
                r = self.execute(&job, limits, &mut result, live) => r,
            }
        };
        self.lock_running().finish(&job.id, job.attempt);
        if matches!(&outcome, Err(f) if f.kind == FailureKind::Cancelled) {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            result.status = ResultStatus::Failed;
        }
        // Live output goes out before the result, so a follower sees it in order.
        if let Some(forwarder) = forwarder {
            let abort = forwarder.abort_handle();
            match tokio::time::timeout(FORWARDER_GRACE, forwarder).await {
                Ok(Ok(dropped)) => {
                    if dropped > 0 {
                        self.stats
                            .live_dropped
                            .fetch_add(dropped, Ordering::Relaxed);
                    }
                }
                _ => {
                    abort.abort();
                    tracing::warn!("live output did not finish in time; the rest is dropped");
                }
            }
        }
        match outcome {
            Err(failure) => {
                result.failure = Some(failure);
                result.output = partial_output(world, &partial);
            }
            Ok(outcome) => {
                let RunOutcome {
                    output,
                    stdout,
                    stderr,
                    run_time,
                } = outcome;
                result.timings.run_ms = run_time.as_millis() as u64;
                result.stdout = stdout;
                result.stderr = stderr;
                match output {
                    Ok(v) => {
                        result.status = ResultStatus::Succeeded;
                        result.failure = None;
                        result.output = Some(v);
                    }
                    Err(f) => {
                        // Input the plugin's world cannot take: it was not called.
                        result.status = if f.kind == FailureKind::BadInput {
                            ResultStatus::Rejected
                        } else {
                            ResultStatus::Failed
                        };
                        result.failure = Some(f);
                        result.output = partial_output(world, &partial);
                    }
                }
            }
        }
        result.duration_ms = started.elapsed().as_millis() as u64;
        self.report(&result).await;
        self.markers.clear(&job.id, job.attempt);
        result
    }

    /// Installs and runs the plugin. Fills `result` (the plugin's name and version,
    /// timings) as it learns them; an `Err` means nothing ran.
    async fn execute(
        &self,
        job: &Job,
        limits: Limits,
        result: &mut JobResult,
        live: LiveSink,
    ) -> Result<RunOutcome, Failure> {
        let installed = self.install(&job.plugin, &mut result.timings).await?;
        tracing::Span::current().record("plugin", installed.manifest.name.as_str());
        let parameters = self.open_parameters(job)?;
        let grant = Grant {
            capabilities: installed.capabilities,
            read_dirs: installed.read_dirs,
            limits,
            run_as: self.config.policy.run_as.clone(),
        };
        let req = RunRequest {
            agent_id: &self.config.id,
            input: &job.input,
            parameters: &parameters,
            grant: &grant,
            live: Some(live),
        };
        Ok(self.sandbox.run(&installed.plugin, &req).await)
    }

    /// The job's parameters in plain text. Secrets are opened here, inside the agent,
    /// and handed only to the run.
    fn open_parameters(&self, job: &Job) -> Result<BTreeMap<String, String>, Failure> {
        let mut parameters = BTreeMap::new();
        for (name, p) in &job.parameters {
            let value = match p {
                Parameter::Plain { value } => value.clone(),
                Parameter::Secret { sealed } => {
                    let aad = drover_protocol::secret::parameter_aad(&job.id, name);
                    let bytes = self.identity.sealing.open(sealed, &aad).map_err(|e| {
                        Failure::new(
                            FailureKind::BadEnvelope,
                            format!("secret parameter {name:?}: {e}"),
                        )
                    })?;
                    String::from_utf8(bytes).map_err(|_| {
                        Failure::new(
                            FailureKind::BadEnvelope,
                            format!("secret parameter {name:?} is not UTF-8"),
                        )
                    })?
                }
            };
            parameters.insert(name.clone(), value);
        }
        Ok(parameters)
    }
}

/// What a program stopped before its end (by the job's deadline, a cancel, or its own
/// timeout) had written, as a command's output marked `partial`, without an exit code;
/// `None` when no program was cut short or it wrote nothing, and for worlds whose
/// output is not a command's.
fn partial_output(world: Option<World>, partial: &Partial) -> Option<serde_json::Value> {
    let [stdout, stderr] = partial.take();
    match world {
        Some(World::CommandRunner | World::Task) => {}
        Some(World::InventoryCollector) | None => return None,
    }
    if stdout.total == 0 && stderr.total == 0 {
        return None;
    }
    let captured = |c: exec::Captured| job::Captured {
        truncated: c.total > c.kept.len() as u64,
        text: String::from_utf8_lossy(&c.kept).into_owned(),
        total_bytes: c.total,
    };
    let output = CommandOutput {
        exit_code: None,
        partial: true,
        stdout: captured(stdout),
        stderr: captured(stderr),
    };
    serde_json::to_value(output).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_requests_for_jobs_not_running_are_remembered_for_a_while() {
        let mut r = Running::default();
        let forever = u64::MAX;
        assert_eq!(r.cancel("a", 1, 1_000, forever), Cancelled::Remembered);
        let (stop, already) = r.start("a", 1);
        assert!(
            already && stop.is_cancelled(),
            "cancelled before it started"
        );
        let (stop, already) = r.start("b", 1);
        assert!(!already && !stop.is_cancelled());
        assert_eq!(r.cancel("b", 1, 1_000, forever), Cancelled::Running);
        assert!(stop.is_cancelled());
        r.finish("b", 1);
        // Remembered for an hour at most, then forgotten.
        assert_eq!(r.cancel("c", 1, 1_000, forever), Cancelled::Remembered);
        r.cancel("d", 1, 1_000 + CANCEL_MEMORY_MS, forever);
        assert!(!r.cancelled.contains_key(&("c".to_string(), 1)));
        assert!(r.cancelled.contains_key(&("d".to_string(), 1)));
        // Bounded: past the bound a request is not kept.
        for i in 0..CANCEL_MEMORY_MAX {
            r.cancel(&format!("x{i}"), 1, 2_000 + CANCEL_MEMORY_MS, forever);
        }
        assert_eq!(
            r.cancel("one-too-many", 1, 2_000 + CANCEL_MEMORY_MS, forever),
            Cancelled::Forgotten
        );
    }

    #[test]
    fn a_cancel_request_stops_its_attempt_only_and_only_until_it_expires() {
        let mut r = Running::default();
        // For attempt 1: a later attempt of the same job is not stopped.
        assert_eq!(r.cancel("j", 1, 1_000, 5_000), Cancelled::Remembered);
        let (stop, already) = r.start("j", 2);
        assert!(!already && !stop.is_cancelled());
        let (running, _) = r.start("k", 2);
        assert_eq!(r.cancel("k", 1, 1_000, 5_000), Cancelled::Remembered);
        assert!(!running.is_cancelled(), "attempt 2 runs on");
        // Remembered until it expires, not an hour.
        r.cancel("other", 1, 5_001, u64::MAX);
        assert!(!r.cancelled.contains_key(&("j".to_string(), 1)));
    }

    /// What a program cut short at its timeout left: `hi\n` on stdout, 1 byte kept.
    fn cut_short() -> Partial {
        let (sink, _rx) = LiveSink::new(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let program = exec::Program::new("/bin/sh", vec!["-c".into(), "echo hi; sleep 5".into()]);
        let e = rt
            .block_on(exec::run(
                &program,
                Duration::from_millis(300),
                1,
                Some(&sink.keep_only()),
            ))
            .unwrap_err();
        assert_eq!(e.kind, exec::ExecErrorKind::TimedOut);
        sink.partial()
    }

    #[test]
    fn a_partial_output_is_a_command_output_without_an_exit_code() {
        assert_eq!(
            partial_output(Some(World::CommandRunner), &cut_short()),
            Some(serde_json::json!({
                "partial": true,
                "stdout": {"text": "h", "total_bytes": 3, "truncated": true},
                "stderr": {"text": "", "total_bytes": 0, "truncated": false},
            }))
        );
        assert!(partial_output(Some(World::Task), &cut_short()).is_some());
        assert_eq!(
            partial_output(Some(World::InventoryCollector), &cut_short()),
            None
        );
        let (sink, _rx) = LiveSink::new(1);
        assert_eq!(
            partial_output(Some(World::Task), &sink.partial()),
            None,
            "nothing written"
        );
    }
}
