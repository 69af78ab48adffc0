//! The job engine's API types: what operators ask for, and what they see of jobs.

use std::collections::BTreeMap;

use drover_protocol::job::{JobResult, Limits, StreamName};
use serde::{Deserialize, Serialize};

pub use super::rollout::{RatePolicy, TargetState};

/// How long an envelope stays valid when the request does not say, seconds.
pub const DEFAULT_DELIVERY_SECS: u64 = 600;

/// An operator's request to run a plugin.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRequest {
    /// The plugin's name.
    pub plugin: String,
    /// Its version; the newest when absent.
    #[serde(default)]
    pub version: Option<u64>,
    /// `all`, `tag:KEY=VALUE`, or comma-separated agent ids.
    pub targets: String,
    /// Input for the plugin, as its world takes it.
    #[serde(default)]
    pub input: serde_json::Value,
    /// The plugin's deadline, seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// The plugin's memory limit, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// The output cap per stream, KiB.
    #[serde(default)]
    pub output_kib: Option<u64>,
    /// How long the job may wait for offline agents, seconds.
    #[serde(default)]
    pub delivery_secs: Option<u64>,
    /// Named parameters for the plugin's `parameters` import.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Secret parameters: sealed to each target agent's key; never stored, logged or
    /// sent in the clear.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Rate control; without it every target gets the job at once.
    #[serde(default)]
    pub rate: Option<RateRequest>,
}

/// Rate control as an operator asks for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RateRequest {
    /// `N` or `N%` of the targets in flight at once; all when absent.
    #[serde(default)]
    pub max_concurrency: Option<String>,
    /// `N` or `N%` errors tolerated before the job stops spreading; no limit when absent.
    #[serde(default)]
    pub max_errors: Option<String>,
    /// `none` or `exponential`.
    #[serde(default)]
    pub ramp: Option<String>,
}

/// What submitting a job produced.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobCreated {
    /// The job's id.
    pub job_id: String,
    /// The plugin version chosen.
    pub version: u64,
    /// The agents it is for.
    pub agents: Vec<String>,
}

/// What cancelling a job did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CancelOutcome {
    /// The job.
    pub job_id: String,
    /// Targets that had not been sent the job and never will.
    pub not_started: usize,
    /// Targets in flight that were asked to stop.
    pub stop_requests: usize,
}

/// A job.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    /// Id: a time-ordered prefix and a random suffix.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version.
    pub version: u64,
    /// The WIT world the plugin implements, which says what its output is.
    #[serde(default = "task_world")]
    pub world: String,
    /// The target selector as given.
    pub targets: String,
    /// Input.
    pub input: serde_json::Value,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
}

fn task_world() -> String {
    "task".into()
}

/// One target of a job.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Target {
    /// The agent.
    pub agent_id: String,
    /// Attempt.
    pub attempt: u32,
    /// The result's status: `pending`, `sent`, `succeeded`, `failed`, `rejected`.
    pub status: String,
    /// Where the target is.
    pub state: TargetState,
    /// Why the server settled it (undeliverable, timed out, cancelled), or how it failed.
    #[serde(default)]
    pub detail: Option<String>,
    /// The result, once in.
    pub result: Option<JobResult>,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// When its envelope was sent, Unix ms.
    #[serde(default)]
    pub dispatched_ms: Option<u64>,
    /// When the agent said it started, Unix ms (the server's clock).
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// When it reached a final state, Unix ms (the server's clock).
    #[serde(default)]
    pub finished_ms: Option<u64>,
}

impl Target {
    /// Whether a result is in, or the server settled the target for good.
    pub fn is_done(&self) -> bool {
        self.result.is_some() || self.state.is_final()
    }
}

/// What a rate-controlled job needs, beyond the job, to send envelopes later; stored so
/// that a restarted server carries on. Secret values are never stored in the clear:
/// each target keeps them sealed to its agent.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutSpec {
    /// The rules.
    pub policy: RatePolicy,
    /// Limits for each run.
    pub limits: Limits,
    /// Plain parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Names of secret parameters.
    #[serde(default)]
    pub secret_names: Vec<String>,
    /// Whether the operator asked for rate control; a plain job is a rollout with
    /// every target at once.
    #[serde(default = "yes")]
    pub rate_controlled: bool,
}

fn yes() -> bool {
    true
}

/// A job's rate control, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutInfo {
    /// The job.
    pub job_id: String,
    /// Its rules, limits and parameters.
    pub spec: RolloutSpec,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Cancelled, Unix ms.
    pub cancelled_ms: Option<u64>,
    /// Every target final, Unix ms.
    pub done_ms: Option<u64>,
}

/// A job with its targets, their states counted, and its rate control if it has any.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    /// The job.
    pub job: Job,
    /// How many targets are in each state.
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// Rate control, for rate-controlled jobs and commands.
    #[serde(default)]
    pub rollout: Option<RolloutInfo>,
    /// Its targets (with `since_ms`, only those changed since).
    pub targets: Vec<Target>,
}

impl JobView {
    /// All targets, from `counts` (which cover every target even when `targets` lists
    /// only recent changes).
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Targets in a final state, from `counts`.
    pub fn done(&self) -> usize {
        TargetState::ALL
            .iter()
            .filter(|s| s.is_final())
            .map(|s| self.counts.get(s.as_str()).copied().unwrap_or(0))
            .sum()
    }
}

/// Targets per state, every state present.
pub fn counts(targets: &[Target]) -> BTreeMap<String, usize> {
    let mut c: BTreeMap<String, usize> = TargetState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    for t in targets {
        *c.entry(t.state.as_str().to_string()).or_default() += 1;
    }
    c
}

/// A job in a listing: the job and its state counts.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    /// The job.
    pub job: Job,
    /// Targets per state.
    pub counts: BTreeMap<String, usize>,
    /// Whether it is rate-controlled.
    pub rate_controlled: bool,
}

/// Listing parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many (default 20, at most 1000).
    pub limit: Option<u32>,
}

/// Long-poll parameters for a job.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Wait up to this long (at most 60 s) for more targets done than `done`.
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// How many targets the caller already knows are done.
    #[serde(default)]
    pub done: Option<usize>,
    /// List only the targets updated at or after this time (the server's clock, as in
    /// `updated_ms`); `counts` still covers every target. A follower passes the largest
    /// `updated_ms` it has seen, so each result travels about once.
    #[serde(default)]
    pub since_ms: Option<u64>,
}

/// Something live about a job, for followers: output as it is written, and state
/// changes.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveEvent {
    /// The job.
    pub job_id: String,
    /// The agent.
    pub agent_id: String,
    /// What happened.
    #[serde(flatten)]
    pub what: LiveWhat,
}

/// What a [`LiveEvent`] says.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum LiveWhat {
    /// Output a running command wrote.
    Output {
        /// Which stream.
        stream: StreamName,
        /// The text.
        text: String,
        /// The agent's sequence number, to show gaps.
        seq: u64,
    },
    /// The target moved to a new state.
    State {
        /// The state.
        state: TargetState,
        /// Why, for failures and server decisions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The follower fell behind and this many events were skipped; the stored results
    /// still have everything.
    Lagged {
        /// How many.
        skipped: u64,
    },
    /// Nothing new; sent every few seconds so a follower knows the stream is alive.
    Keepalive,
    /// Every target is final; nothing more will come.
    End,
}
