//! Run Command: a command across the fleet, as a rate-controlled job of the command
//! runner plugin (`plugins/command`).
//!
//! A command is an ordinary job whose plugin runs a program or shell script through the
//! agent's `process` import, so it carries every guarantee a job does: a signed envelope,
//! the agent's capability policy (the plugin asks for `exec: ["*"]`, which an agent's
//! policy must allow explicitly), a deadline that kills the process tree, and a result
//! that is stored once and acknowledged end to end.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::{JobRequest, RateRequest};
use crate::rollout::TargetState;
use crate::store::{JobRow, RolloutRow, TargetRow};

/// The plugin that runs commands, unless a request names another.
pub const COMMAND_PLUGIN: &str = "command";

/// The default cap on each output stream of each target.
pub const DEFAULT_OUTPUT_KIB: u64 = 1024;

/// An operator's command.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// The plugin that runs it (default [`COMMAND_PLUGIN`]).
    #[serde(default)]
    pub plugin: Option<String>,
    /// Send output live while the command runs (default true).
    #[serde(default)]
    pub stream: Option<bool>,
}

impl CommandRequest {
    /// The job that runs this command.
    pub fn into_job(self) -> Result<JobRequest, String> {
        let mut input = serde_json::Map::new();
        match (self.argv.is_empty(), &self.script) {
            (false, None) => {
                input.insert("argv".into(), self.argv.clone().into());
            }
            (true, Some(script)) if !script.trim().is_empty() => {
                input.insert("script".into(), script.clone().into());
                if let Some(shell) = &self.shell {
                    input.insert("shell".into(), shell.clone().into());
                }
            }
            (true, _) => return Err("a command needs argv or a script".into()),
            (false, Some(_)) => return Err("give argv or a script, not both".into()),
        }
        if let Some(cwd) = &self.cwd {
            input.insert("cwd".into(), cwd.clone().into());
        }
        if !self.env.is_empty() {
            input.insert("env".into(), serde_json::to_value(&self.env).expect("maps"));
        }
        if let Some(user) = &self.run_as {
            input.insert("run_as".into(), user.clone().into());
        }
        input.insert("stream".into(), self.stream.unwrap_or(true).into());
        Ok(JobRequest {
            plugin: self.plugin.unwrap_or_else(|| COMMAND_PLUGIN.to_string()),
            version: None,
            targets: self.targets,
            input: serde_json::Value::Object(input),
            timeout_secs: Some(self.timeout_secs.unwrap_or(600)),
            memory_mib: None,
            output_kib: Some(self.output_kib.unwrap_or(DEFAULT_OUTPUT_KIB)),
            delivery_secs: self.delivery_secs,
            parameters: BTreeMap::new(),
            secrets: BTreeMap::new(),
            rate: Some(self.rate),
        })
    }
}

/// A job with its targets, their states counted, and its rate control if it has any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    /// The job.
    pub job: JobRow,
    /// How many targets are in each state.
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// Rate control, for rate-controlled jobs and commands.
    #[serde(default)]
    pub rollout: Option<RolloutRow>,
    /// Its targets.
    pub targets: Vec<TargetRow>,
}

impl JobView {
    /// Builds the view and its counts.
    pub fn new(job: JobRow, rollout: Option<RolloutRow>, targets: Vec<TargetRow>) -> JobView {
        JobView {
            job,
            counts: counts(&targets),
            rollout,
            targets,
        }
    }

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
pub fn counts(targets: &[TargetRow]) -> BTreeMap<String, usize> {
    let mut c: BTreeMap<String, usize> = TargetState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    for t in targets {
        *c.entry(t.state.as_str().to_string()).or_default() += 1;
    }
    c
}

/// A command's captured stream, from a command runner's output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// What was kept.
    #[serde(default)]
    pub text: String,
    /// Bytes the command wrote in all.
    #[serde(default)]
    pub total_bytes: u64,
    /// Whether `text` is shorter than what was written.
    #[serde(default)]
    pub truncated: bool,
}

/// What a command runner returns; or, for a command stopped by its timeout or a cancel,
/// what the agent kept of its output, marked `partial` and without an exit code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// The exit code; -1 when a signal ended it; none when the command was stopped.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Output of a command that was stopped before it ended.
    #[serde(default)]
    pub partial: bool,
    /// Stdout.
    #[serde(default)]
    pub stdout: Stream,
    /// Stderr.
    #[serde(default)]
    pub stderr: Stream,
}

impl CommandOutput {
    /// Reads a command runner's output from a target, if it has one.
    pub fn of(t: &TargetRow) -> Option<CommandOutput> {
        let v = t.result.as_ref()?.output.as_ref()?;
        serde_json::from_value(v.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_become_rate_controlled_jobs_of_the_command_plugin() {
        let job = CommandRequest {
            targets: "all".into(),
            argv: vec!["uname".into(), "-a".into()],
            rate: RateRequest {
                max_concurrency: Some("10%".into()),
                ..Default::default()
            },
            env: [("A".to_string(), "1".to_string())].into(),
            ..Default::default()
        }
        .into_job()
        .unwrap();
        assert_eq!(job.plugin, COMMAND_PLUGIN);
        assert_eq!(job.input["argv"], serde_json::json!(["uname", "-a"]));
        assert_eq!(job.input["env"]["A"], "1");
        assert_eq!(job.output_kib, Some(1024));
        assert_eq!(job.rate.unwrap().max_concurrency.as_deref(), Some("10%"));
        let job = CommandRequest {
            targets: "all".into(),
            script: Some("echo hi | wc -c".into()),
            ..Default::default()
        }
        .into_job()
        .unwrap();
        assert_eq!(job.input["script"], "echo hi | wc -c");
        assert!(job.input.get("argv").is_none());
        for bad in [
            CommandRequest::default(),
            CommandRequest {
                argv: vec!["x".into()],
                script: Some("y".into()),
                ..Default::default()
            },
            CommandRequest {
                script: Some("  ".into()),
                ..Default::default()
            },
        ] {
            assert!(bad.into_job().is_err());
        }
    }
}
