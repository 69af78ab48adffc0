//! The typed inputs and outputs of the plugin worlds in `wit/worlds.wit`, as both sides
//! see them: the agent turns a world's WIT records into these (its conversions name every
//! field, so a change to the WIT does not compile until it is made here too), and the
//! server reads results through them.
//!
//! On the wire a job's input and a result's output stay JSON; these types say what that
//! JSON is for each world.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::Captured;
use crate::manifest::World;

/// The `command-runner` world: a program or a shell script run through the `process`
/// import (`wit/run-command.wit`).
pub mod command {
    use super::*;

    /// The shell used for a script unless the request names another.
    pub const DEFAULT_SHELL: &str = "/bin/sh";

    /// What to run: the WIT record `run-command.request`, as a job's input.
    ///
    /// Unknown fields are refused, so a misspelt one is not silently ignored.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CommandRequest {
        /// The program and its arguments: run directly when the program is a clean
        /// absolute path, else looked up in `PATH` by the shell. Either this or `script`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub argv: Vec<String>,
        /// A shell script. Either this or `argv`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub script: Option<String>,
        /// The shell's absolute path ([`DEFAULT_SHELL`] when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shell: Option<String>,
        /// The working directory (`/` when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cwd: Option<String>,
        /// Environment variables added to the command's.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub env: BTreeMap<String, String>,
        /// The user to run as; the agent's policy must allow it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub run_as: Option<String>,
        /// Whether the agent forwards output live while the command runs.
        #[serde(default = "yes")]
        pub stream: bool,
    }

    fn yes() -> bool {
        true
    }

    /// What a command did: the WIT record `run-command.output`; or, for a command
    /// stopped by its timeout or a cancel, what the agent kept of its output, marked
    /// `partial`, without an exit code.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CommandOutput {
        /// The exit code; -1 when a signal ended it; none when the command was stopped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub exit_code: Option<i64>,
        /// Output of a command that was stopped before it ended.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub partial: bool,
        /// Stdout.
        #[serde(default)]
        pub stdout: Captured,
        /// Stderr.
        #[serde(default)]
        pub stderr: Captured,
    }
}

/// The `inventory-collector` world (`wit/inventory.wit`).
pub mod inventory {
    use super::*;

    /// Settings for one collection: the WIT record `inventory.collect-request`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CollectRequest {
        /// Whether to list installed packages.
        pub packages: bool,
        /// The job's whole input, as JSON text.
        pub extra: String,
    }

    impl CollectRequest {
        /// The request a job's input asks for: packages unless `"packages": false`.
        pub fn from_input(input: &serde_json::Value) -> CollectRequest {
            CollectRequest {
                packages: input
                    .get("packages")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true),
                extra: input.to_string(),
            }
        }
    }

    /// The WIT record `inventory.os-info`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct OsInfo {
        /// The OS family, such as `linux`.
        pub family: String,
        /// The distribution's name.
        pub name: String,
        /// The distribution's version.
        pub version: String,
        /// The kernel version.
        pub kernel_version: String,
        /// The CPU architecture.
        pub architecture: String,
        /// The host name.
        pub hostname: String,
    }

    /// The WIT record `inventory.installed-package`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct InstalledPackage {
        /// The package's name.
        pub name: String,
        /// The installed version, as the package manager prints it.
        pub version: String,
        /// The package's architecture.
        pub architecture: String,
        /// The package manager it came from.
        pub source: String,
    }

    /// The WIT record `inventory.custom-item`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CustomItem {
        /// The inventory type, such as `Custom:RackInfo`.
        pub type_name: String,
        /// Name/value pairs.
        pub attributes: Vec<(String, String)>,
    }

    /// Everything one collection found: the WIT record `inventory.inventory`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Inventory {
        /// The operating system.
        pub os: OsInfo,
        /// Installed packages.
        pub packages: Vec<InstalledPackage>,
        /// Custom items.
        pub custom: Vec<CustomItem>,
        /// What the collector could not read.
        pub warnings: Vec<String>,
    }
}

/// A result's output, read as its world says.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// From an `inventory-collector`.
    Inventory(inventory::Inventory),
    /// From a `command-runner`.
    Command(command::CommandOutput),
    /// From a `task`: any JSON.
    Task(serde_json::Value),
}

impl Output {
    /// Reads `value`, the output of a plugin of `world`.
    pub fn parse(world: World, value: &serde_json::Value) -> Result<Output, String> {
        let typed =
            |e: serde_json::Error| format!("output is not a {} output: {e}", world.as_str());
        Ok(match world {
            World::InventoryCollector => {
                Output::Inventory(serde_json::from_value(value.clone()).map_err(typed)?)
            }
            World::CommandRunner => {
                Output::Command(serde_json::from_value(value.clone()).map_err(typed)?)
            }
            World::Task => Output::Task(value.clone()),
        })
    }

    /// Why the work this output describes failed, when it did although the plugin
    /// succeeded: a command that exited with a non-zero code.
    pub fn failure(&self) -> Option<String> {
        match self {
            Output::Command(c) => match c.exit_code {
                Some(0) | None => None,
                Some(code) => Some(format!("exit code {code}")),
            },
            Output::Inventory(_) | Output::Task(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::command::*;
    use super::*;

    #[test]
    fn command_requests_refuse_unknown_fields_and_stream_by_default() {
        let r: CommandRequest = serde_json::from_str(r#"{"argv": ["ls", "-l"]}"#).unwrap();
        assert!(r.stream);
        assert_eq!(r.argv, ["ls", "-l"]);
        let e = serde_json::from_str::<CommandRequest>(r#"{"script": "x", "timeout": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `timeout`"), "{e}");
        // What the server sends is what the agent reads.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"argv": ["ls", "-l"], "stream": true})
        );
    }

    #[test]
    fn a_partial_command_output_has_no_exit_code_and_says_partial() {
        let partial = CommandOutput {
            partial: true,
            ..Default::default()
        };
        let v = serde_json::to_value(&partial).unwrap();
        assert!(v.get("exit_code").is_none());
        assert_eq!(v["partial"], true);
        let done = CommandOutput {
            exit_code: Some(3),
            ..Default::default()
        };
        let v = serde_json::to_value(&done).unwrap();
        assert!(v.get("partial").is_none());
        let out = Output::parse(World::CommandRunner, &v).unwrap();
        assert_eq!(out.failure().as_deref(), Some("exit code 3"));
        assert_eq!(
            Output::parse(
                World::CommandRunner,
                &serde_json::to_value(&partial).unwrap()
            )
            .unwrap()
            .failure(),
            None
        );
    }

    #[test]
    fn a_task_output_is_any_json_and_never_judged() {
        let v = serde_json::json!({"exit_code": 3});
        let out = Output::parse(World::Task, &v).unwrap();
        assert_eq!(out, Output::Task(v));
        assert_eq!(out.failure(), None);
        assert!(Output::parse(World::InventoryCollector, &serde_json::json!(1)).is_err());
    }
}
