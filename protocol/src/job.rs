//! Jobs: the signed envelope the control plane sends, and the result an agent returns.

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::signed::{Signable, Signed};

/// Resource limits for one run. The agent applies the smaller of these and its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Limits {
    /// Wall-clock deadline for the plugin call, in milliseconds.
    pub timeout_ms: u64,
    /// Largest linear memory the plugin may grow to, in bytes.
    pub memory_bytes: u64,
    /// Most bytes kept of each of stdout and stderr, and of the returned output.
    pub output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: 60_000,
            memory_bytes: 256 << 20,
            output_bytes: 1 << 20,
        }
    }
}

/// A job for one agent, signed by the control-plane key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEnvelope {
    /// Unique per job.
    pub job_id: String,
    /// The one agent this envelope is for.
    pub agent_id: String,
    /// Starts at 1; a retry of the same job to the same agent increments it.
    pub attempt: u32,
    /// The plugin to run, with its publisher's signature.
    pub plugin: Signed<Manifest>,
    /// The job's input, handed to the plugin.
    pub input: serde_json::Value,
    /// Named parameters for the plugin's `parameters` import; secret ones are sealed to
    /// this agent (see [`crate::secret`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub parameters: std::collections::BTreeMap<String, Parameter>,
    /// Limits for the run.
    pub limits: Limits,
    /// Not valid before this time, Unix milliseconds.
    pub not_before_ms: u64,
    /// Not valid after this time, Unix milliseconds.
    pub expires_at_ms: u64,
    /// A copy the control plane sent again, because the agent reconnected before
    /// answering and the broker may have lost the first. An agent that already has the
    /// job ignores it without reporting a replay; it never runs a job twice either way,
    /// since what it has seen is kept per (job, attempt).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
}

impl Signable for JobEnvelope {
    const CONTEXT: &'static str = "job-envelope-v1";
}

/// One named parameter of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Parameter {
    /// A value anyone on the path may see.
    Plain {
        /// The value.
        value: String,
    },
    /// A value sealed to the target agent; the AAD is
    /// [`crate::secret::parameter_aad`] of the job and the name.
    Secret {
        /// The sealed value.
        sealed: crate::secret::SealedBox,
    },
}

/// How a job ended on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ResultStatus {
    /// The plugin ran and returned output.
    Succeeded,
    /// The plugin ran and failed: an error, a trap, or a limit.
    Failed,
    /// The agent refused the job before anything ran.
    Rejected,
}

impl ResultStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Succeeded => "succeeded",
            ResultStatus::Failed => "failed",
            ResultStatus::Rejected => "rejected",
        }
    }
}

/// Why a job did not succeed. The first group are refusals (nothing ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureKind {
    /// The envelope's signature or encoding is bad.
    BadEnvelope,
    /// The envelope is addressed to another agent.
    Misaddressed,
    /// The envelope is expired or not yet valid.
    Stale,
    /// The envelope was already seen.
    Replayed,
    /// The manifest is unsigned, badly signed, signed by an untrusted key, or invalid.
    UntrustedPlugin,
    /// The plugin's manifest has expired.
    ExpiredPlugin,
    /// The blob's hash or length does not match the manifest.
    BlobMismatch,
    /// The blob could not be fetched.
    FetchFailed,
    /// The manifest asks for capabilities the agent's policy does not allow.
    PolicyDenied,
    /// The component failed to compile or link.
    CompileFailed,
    /// The agent is out of capacity or disk.
    AgentError,
    /// The plugin returned an error.
    PluginError,
    /// The plugin trapped (a panic, an abort, an invalid operation).
    Trap,
    /// The wall-clock deadline passed.
    Timeout,
    /// The plugin tried to grow memory past the limit.
    MemoryLimit,
    /// The plugin's returned output exceeded the output cap.
    OutputLimit,
    /// The plugin's returned output is not what its world promises.
    BadOutput,
    /// The job's input is not what the plugin's world takes; the plugin was not called.
    BadInput,
    /// The agent stopped (crashed, was killed) while the job ran; it is not re-run.
    Interrupted,
    /// The operator cancelled the job; whatever it started was killed.
    Cancelled,
}

impl FailureKind {
    /// Whether this kind means the job was refused before anything ran.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            FailureKind::BadEnvelope
                | FailureKind::Misaddressed
                | FailureKind::Stale
                | FailureKind::Replayed
                | FailureKind::UntrustedPlugin
                | FailureKind::ExpiredPlugin
                | FailureKind::BlobMismatch
                | FailureKind::FetchFailed
                | FailureKind::PolicyDenied
                | FailureKind::CompileFailed
                | FailureKind::AgentError
                | FailureKind::BadInput
        )
    }
}

/// What went wrong, for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Failure {
    /// The category.
    pub kind: FailureKind,
    /// One sentence saying what happened.
    pub message: String,
    /// Whether running the job again unchanged could succeed.
    #[serde(default)]
    pub retryable: bool,
    /// Which case of the WIT `plugin-error` variant a plugin returned, for
    /// [`FailureKind::PluginError`] from plugins built against `drover:plugin@0.2.0` or
    /// later; none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_error: Option<PluginErrorKind>,
}

impl Failure {
    /// A failure that no plugin reported, and that a retry cannot mend.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            retryable: false,
            plugin_error: None,
        }
    }
}

/// The cases of the WIT `plugin-error` variant (`wit/types.wit`), which say why a
/// plugin could not do its work and whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PluginErrorKind {
    /// Something was not granted or not allowed. A retry cannot help until the
    /// manifest or the agent's policy changes.
    Denied,
    /// The job's input or parameters are wrong. A retry cannot help until they change.
    InvalidInput,
    /// Something needed is missing or busy right now. A retry may help.
    Unavailable,
    /// An operation did not finish in time. A retry may help.
    TimedOut,
    /// The work failed for another reason. A retry is not expected to help.
    Failed,
}

impl PluginErrorKind {
    /// Whether running the same job again, unchanged, could succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            PluginErrorKind::Unavailable | PluginErrorKind::TimedOut
        )
    }

    /// The name used in results and by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginErrorKind::Denied => "denied",
            PluginErrorKind::InvalidInput => "invalid_input",
            PluginErrorKind::Unavailable => "unavailable",
            PluginErrorKind::TimedOut => "timed_out",
            PluginErrorKind::Failed => "failed",
        }
    }
}

/// Captured bytes of one output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Captured {
    /// What was kept, as UTF-8 (invalid sequences replaced).
    pub text: String,
    /// Bytes the plugin wrote in all.
    pub total_bytes: u64,
    /// Whether `text` is shorter than what was written.
    pub truncated: bool,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Timings {
    /// Fetching the blob; 0 when cached.
    pub fetch_ms: u64,
    /// Compiling or loading the precompiled component.
    pub load_ms: u64,
    /// Whether the precompiled component came from the cache.
    pub compile_cached: bool,
    /// Instantiating and running the plugin.
    pub run_ms: u64,
}

/// A job's result from one agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobResult {
    /// The job.
    pub job_id: String,
    /// The agent that ran it.
    pub agent_id: String,
    /// The attempt this result is for.
    pub attempt: u32,
    /// The plugin's name, or empty when the envelope could not be read.
    pub plugin: String,
    /// The plugin's version, or 0.
    pub plugin_version: u64,
    /// How it ended.
    pub status: ResultStatus,
    /// Why it did not succeed.
    pub failure: Option<Failure>,
    /// The plugin's output (JSON), when it succeeded.
    pub output: Option<serde_json::Value>,
    /// The plugin's stdout.
    pub stdout: Captured,
    /// The plugin's stderr.
    pub stderr: Captured,
    /// When the agent started on it, Unix milliseconds.
    pub started_at_ms: u64,
    /// How long the agent spent on it in all.
    pub duration_ms: u64,
    /// Where the time went.
    pub timings: Timings,
}

impl JobResult {
    /// A refusal: nothing ran.
    pub fn refused(
        job_id: &str,
        agent_id: &str,
        attempt: u32,
        kind: FailureKind,
        message: String,
    ) -> JobResult {
        JobResult {
            job_id: job_id.to_string(),
            agent_id: agent_id.to_string(),
            attempt,
            plugin: String::new(),
            plugin_version: 0,
            status: ResultStatus::Rejected,
            failure: Some(Failure::new(kind, message)),
            output: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            started_at_ms: crate::now_ms(),
            duration_ms: 0,
            timings: Timings::default(),
        }
    }
}

/// The control plane's acknowledgement that a result is stored, signed by the
/// control-plane key: the agent deletes a result from its outbox only on an ack that
/// names it (agent, job, attempt) and the very bytes it sent, so a broker can neither
/// forge one nor ack a result it swallowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultAck {
    /// The agent whose result it is.
    pub agent_id: String,
    /// The job.
    pub job_id: String,
    /// The attempt.
    pub attempt: u32,
    /// SHA-256 (hex) of the result message exactly as the agent published it (its signed
    /// JSON), which is what the control plane stored.
    pub result_sha256: String,
}

impl Signable for ResultAck {
    const CONTEXT: &'static str = "result-ack-v1";
}

/// Which output stream a piece of live output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a progress report says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum ProgressEvent {
    /// The envelope passed its checks and the job is starting.
    Started,
    /// Output a running program wrote. Best effort: the result carries the full output
    /// up to the cap, so a dropped piece of live output loses nothing.
    Output {
        /// Which stream.
        stream: StreamName,
        /// The bytes, as UTF-8 (invalid sequences replaced).
        text: String,
    },
}

/// A job's progress on one agent, signed by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The job.
    pub job_id: String,
    /// The agent.
    pub agent_id: String,
    /// The attempt.
    pub attempt: u32,
    /// Counts up from 0 per job and attempt, so a reader sees gaps and order.
    pub seq: u64,
    /// When, Unix milliseconds.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: ProgressEvent,
}

impl Signable for Progress {
    const CONTEXT: &'static str = "job-progress-v1";
}

/// The control plane's request to stop a job on one agent, signed by the control-plane
/// key. An agent that has not started the job yet never starts it. It holds for one
/// attempt, and only until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The job.
    pub job_id: String,
    /// The agent this request is for.
    pub agent_id: String,
    /// The attempt it stops; a later attempt of the same job is not affected.
    pub attempt: u32,
    /// When the operator asked, Unix milliseconds.
    pub at_ms: u64,
    /// After this (Unix milliseconds), agents ignore it: a captured request cannot be
    /// replayed against a later run.
    pub expires_at_ms: u64,
}

impl Signable for CancelRequest {
    const CONTEXT: &'static str = "job-cancel-v2";
}
