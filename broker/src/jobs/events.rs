//! What the engine tells capabilities: a target reached a final state. Appended to the
//! event log in the same transaction as the result (or the server's decision), so a
//! consumer never misses one, also across a crash.
//!
//! The log keeps the event small; `Jobs::finished` hands a consumer the typed event with
//! the result and its typed output, read from the target's row.

use drover_protocol::job::JobResult;
use drover_protocol::worlds::Output;
use serde::{Deserialize, Serialize};

use super::rollout::TargetState;

/// The kind of [`TargetFinished`] in the log.
pub const TARGET_FINISHED: &str = "job.target_finished";

/// A target reached a final state: the body of a `job.target_finished` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFinished {
    /// The job.
    pub job_id: String,
    /// The agent.
    pub agent_id: String,
    /// The attempt.
    pub attempt: u32,
    /// The plugin.
    pub plugin: String,
    /// Its version.
    pub version: u64,
    /// The world it implements.
    pub world: String,
    /// The final state.
    pub state: TargetState,
    /// Why, for failures and the server's decisions.
    #[serde(default)]
    pub detail: Option<String>,
}

/// A finished target, as a consumer gets it: the event, the result (none when the
/// server settled the target without one) and the result's output, typed by its world.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The event's id in the log.
    pub event_id: i64,
    /// When the target finished, Unix ms.
    pub at_ms: u64,
    /// What finished.
    pub target: TargetFinished,
    /// The agent's result.
    pub result: Option<JobResult>,
    /// The result's output, as its world defines it; none without one, or when it does
    /// not fit the world (the result still has it, untyped).
    pub output: Option<Output>,
}
