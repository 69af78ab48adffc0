//! Run Command's API types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::jobs::types::RateRequest;

/// The plugin that runs commands, unless a request names another.
pub const COMMAND_PLUGIN: &str = "command";

/// The default cap on each output stream of each target, KiB.
pub const DEFAULT_OUTPUT_KIB: u64 = 1024;

/// An operator's command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandRequest {
    /// `all`, `tag:KEY=VALUE`, or comma-separated agent ids.
    pub targets: String,
    /// The program and its arguments: run directly when the program is a clean absolute
    /// path, else looked up in `PATH` by the shell. Either this or `script`.
    #[serde(default)]
    pub argv: Vec<String>,
    /// A shell script. Either this or `argv`.
    #[serde(default)]
    pub script: Option<String>,
    /// The shell for `script` (default `/bin/sh`).
    #[serde(default)]
    pub shell: Option<String>,
    /// The working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A user to run as; the agent's policy must allow it.
    #[serde(default)]
    pub run_as: Option<String>,
    /// The command's deadline on each agent, seconds (default 600).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// How long offline agents may still receive it, seconds (default 600).
    #[serde(default)]
    pub delivery_secs: Option<u64>,
    /// The cap on each output stream, KiB (default 1024).
    #[serde(default)]
    pub output_kib: Option<u64>,
    /// Rate control: `max_concurrency`, `max_errors` and `ramp`, beside the other fields.
    #[serde(flatten)]
    pub rate: RateRequest,
    /// The plugin that runs it (default `command`); it must implement the
    /// `command-runner` world.
    #[serde(default)]
    pub plugin: Option<String>,
    /// Send output live while the command runs (default true).
    #[serde(default)]
    pub stream: Option<bool>,
}

/// A command in a listing: what it ran, where, and how its targets ended.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandSummary {
    /// The command's id (its job's).
    pub id: String,
    /// The target selector as given.
    pub targets: String,
    /// What it runs: the program and arguments, or the script.
    pub what: String,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Targets per state.
    pub counts: BTreeMap<String, usize>,
    /// Targets per exit code, of those that ran to an end.
    pub exit_codes: BTreeMap<String, usize>,
    /// Targets stopped before their command ended (timeout, cancel), whose output is
    /// partial.
    pub partial: usize,
}

/// Listing parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandListQuery {
    /// At most this many (default 20, at most 1000).
    pub limit: Option<u32>,
}
