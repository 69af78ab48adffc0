//! The worlds of `drover:plugin@0.2.0` (`wit/`): their bindings, a job's input read as
//! each world takes it, and the conversions between their WIT records and
//! `drover_protocol::worlds`. Every conversion names every field, so a change to the WIT
//! does not compile until `protocol` says what it means.

use drover_protocol::job::{self, Failure, FailureKind, PluginErrorKind};
use drover_protocol::manifest::World;
use drover_protocol::worlds::{Output, command, inventory};
use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::host::Host;

/// The contract version these bindings are for.
pub const VERSION: &str = "0.2.0";

/// The bindings of `wit/`.
pub use super::bindings::v0_2 as bindings;

use bindings::command_runner::drover::plugin::run_command as wit_command;
use bindings::drover::plugin::{inventory as wit_inventory, types};

/// A job's input, read as the plugin's world takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// For an `inventory-collector`.
    Inventory(inventory::CollectRequest),
    /// For a `command-runner`.
    Command(command::CommandRequest),
    /// For a `task`: the input as JSON text.
    Task(String),
}

impl Input {
    /// Reads a job's input for a plugin of `world`. Input a world cannot take is a
    /// [`FailureKind::BadInput`] refusal: the plugin is not called.
    pub fn parse(world: World, input: &serde_json::Value) -> Result<Input, Failure> {
        Ok(match world {
            World::InventoryCollector => {
                Input::Inventory(inventory::CollectRequest::from_input(input))
            }
            World::CommandRunner => {
                Input::Command(serde_json::from_value(input.clone()).map_err(|e| {
                    Failure::new(
                        FailureKind::BadInput,
                        format!("job input is not a command-runner request: {e}"),
                    )
                })?)
            }
            World::Task => Input::Task(input.to_string()),
        })
    }
}

/// A plugin's output as the JSON of its result.
pub fn to_json(output: Output) -> serde_json::Result<serde_json::Value> {
    match output {
        Output::Inventory(i) => serde_json::to_value(i),
        Output::Command(c) => serde_json::to_value(c),
        Output::Task(v) => Ok(v),
    }
}

/// A task's output text as JSON; text that is not JSON is the plugin's failure.
pub fn task_output(text: &str) -> Result<Output, Failure> {
    serde_json::from_str(text).map(Output::Task).map_err(|e| {
        Failure::new(
            FailureKind::PluginError,
            format!("plugin returned output that is not JSON: {e}"),
        )
    })
}

/// The typed exports of a `drover:plugin@0.2.0` plugin, checked when it was loaded.
#[derive(Clone)]
pub enum Exports {
    /// `inventory-collector`.
    Inventory(bindings::InventoryCollectorPre<Host>),
    /// `command-runner`.
    Command(bindings::command_runner::CommandRunnerPre<Host>),
    /// `task`.
    Task(bindings::task::TaskPre<Host>),
}

impl Exports {
    /// Checks that the component exports `world`.
    pub fn new(pre: InstancePre<Host>, world: World) -> wasmtime::Result<Exports> {
        Ok(match world {
            World::InventoryCollector => {
                Exports::Inventory(bindings::InventoryCollectorPre::new(pre)?)
            }
            World::CommandRunner => {
                Exports::Command(bindings::command_runner::CommandRunnerPre::new(pre)?)
            }
            World::Task => Exports::Task(bindings::task::TaskPre::new(pre)?),
        })
    }

    /// Instantiates the plugin and calls its world's export.
    pub async fn call(
        &self,
        store: &mut Store<Host>,
        input: Input,
    ) -> wasmtime::Result<Result<Output, Failure>> {
        Ok(match (self, input) {
            (Exports::Inventory(pre), Input::Inventory(request)) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                instance
                    .call_collect(&mut *store, &collect_request(request))
                    .await?
                    .map(|i| Output::Inventory(from_inventory(i)))
                    .map_err(failure)
            }
            (Exports::Command(pre), Input::Command(request)) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                instance
                    .call_run(&mut *store, &command_request(request))
                    .await?
                    .map(|o| Output::Command(from_command_output(o)))
                    .map_err(failure)
            }
            (Exports::Task(pre), Input::Task(text)) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                match instance.call_run(&mut *store, &text).await? {
                    Ok(out) => task_output(&out),
                    Err(e) => Err(failure(e)),
                }
            }
            (_, input) => Err(mismatch(&input)),
        })
    }
}

/// Input read for another world than the plugin's: a bug in the agent, never the job's.
pub fn mismatch(input: &Input) -> Failure {
    Failure::new(
        FailureKind::AgentError,
        format!("the agent read the job's input for another world: {input:?}"),
    )
}

/// A plugin's error as the job's failure: the case says whether a retry can help.
pub fn failure(e: types::PluginError) -> Failure {
    use types::PluginError as E;
    let (case, message) = match e {
        E::Denied(m) => (PluginErrorKind::Denied, m),
        E::InvalidInput(m) => (PluginErrorKind::InvalidInput, m),
        E::Unavailable(m) => (PluginErrorKind::Unavailable, m),
        E::TimedOut(m) => (PluginErrorKind::TimedOut, m),
        E::Failed(m) => (PluginErrorKind::Failed, m),
    };
    Failure {
        kind: FailureKind::PluginError,
        message,
        retryable: case.retryable(),
        plugin_error: Some(case),
    }
}

/// The conversions between a contract version's `inventory` records (`$wit`, a module in
/// scope) and `drover_protocol::worlds::inventory`: `collect_request` and `from_inventory`.
/// The records are the same at 0.1.0 and 0.2.0 but are distinct generated types, so both
/// versions expand this one text rather than keep a copy each.
macro_rules! inventory_conversions {
    ($wit:ident) => {
        fn collect_request(r: inventory::CollectRequest) -> $wit::CollectRequest {
            let inventory::CollectRequest { packages, extra } = r;
            $wit::CollectRequest { packages, extra }
        }

        fn from_inventory(i: $wit::Inventory) -> inventory::Inventory {
            let $wit::Inventory {
                os,
                packages,
                custom,
                warnings,
            } = i;
            let $wit::OsInfo {
                family,
                name,
                version,
                kernel_version,
                architecture,
                hostname,
            } = os;
            inventory::Inventory {
                os: inventory::OsInfo {
                    family,
                    name,
                    version,
                    kernel_version,
                    architecture,
                    hostname,
                },
                packages: packages
                    .into_iter()
                    .map(|p| {
                        let $wit::InstalledPackage {
                            name,
                            version,
                            architecture,
                            source,
                        } = p;
                        inventory::InstalledPackage {
                            name,
                            version,
                            architecture,
                            source,
                        }
                    })
                    .collect(),
                custom: custom
                    .into_iter()
                    .map(|c| {
                        let $wit::CustomItem {
                            type_name,
                            attributes,
                        } = c;
                        inventory::CustomItem {
                            type_name,
                            attributes,
                        }
                    })
                    .collect(),
                warnings,
            }
        }
    };
}
pub(super) use inventory_conversions;

inventory_conversions!(wit_inventory);

fn command_request(r: command::CommandRequest) -> wit_command::Request {
    let command::CommandRequest {
        argv,
        script,
        shell,
        cwd,
        env,
        run_as,
        stream,
    } = r;
    wit_command::Request {
        argv,
        script,
        shell,
        cwd,
        env: env.into_iter().collect(),
        run_as,
        stream_output: stream,
    }
}

fn from_command_output(o: wit_command::Output) -> command::CommandOutput {
    let wit_command::Output {
        exit_code,
        stdout,
        stderr,
    } = o;
    command::CommandOutput {
        exit_code: Some(exit_code.into()),
        partial: false,
        stdout: from_captured(stdout),
        stderr: from_captured(stderr),
    }
}

fn from_captured(c: wit_command::Captured) -> job::Captured {
    let wit_command::Captured {
        text,
        total_bytes,
        truncated,
    } = c;
    job::Captured {
        text,
        total_bytes,
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_input_is_read_typed_and_a_mismatch_is_a_refusal() {
        let input = json!({"argv": ["ls", "-l"], "env": {"B": "2", "A": "1"}, "cwd": "/tmp"});
        let Input::Command(r) = Input::parse(World::CommandRunner, &input).unwrap() else {
            panic!("not a command");
        };
        let wit = command_request(r);
        assert_eq!(wit.argv, ["ls", "-l"]);
        assert_eq!(
            wit.env,
            [("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(wit.cwd.as_deref(), Some("/tmp"));
        assert!(wit.stream_output, "streams unless asked not to");
        for (bad, why) in [
            (
                json!({"script": "x", "timeout": 5}),
                "unknown field `timeout`",
            ),
            (json!({"script": 1}), "invalid type"),
            (json!({"argv": "ls -l"}), "invalid type"),
            (json!({"script": "x", "env": {"A": 1}}), "invalid type"),
            (json!("echo hi"), "invalid type"),
        ] {
            let f = Input::parse(World::CommandRunner, &bad).unwrap_err();
            assert_eq!(f.kind, FailureKind::BadInput, "{bad}");
            assert!(f.message.contains(why), "{bad}: {}", f.message);
            assert!(!f.retryable && f.plugin_error.is_none());
        }
    }

    #[test]
    fn command_output_is_the_json_of_today() {
        let out = from_command_output(wit_command::Output {
            exit_code: 3,
            stdout: wit_command::Captured {
                text: "out\n".into(),
                total_bytes: 4,
                truncated: false,
            },
            stderr: wit_command::Captured {
                text: "e".into(),
                total_bytes: 5000,
                truncated: true,
            },
        });
        assert_eq!(
            to_json(Output::Command(out)).unwrap(),
            json!({
                "exit_code": 3,
                "stdout": {"text": "out\n", "total_bytes": 4, "truncated": false},
                "stderr": {"text": "e", "total_bytes": 5000, "truncated": true},
            })
        );
    }

    /// The keys the server reads (`os.kernel_version`, `packages`, ...) are those the
    /// agent wrote when it serialised the WIT records themselves.
    #[test]
    fn inventory_output_is_the_json_of_today() {
        let inv = from_inventory(wit_inventory::Inventory {
            os: wit_inventory::OsInfo {
                family: "linux".into(),
                name: "Debian GNU/Linux".into(),
                version: "12".into(),
                kernel_version: "6.1.0".into(),
                architecture: "x86_64".into(),
                hostname: "web-1".into(),
            },
            packages: vec![wit_inventory::InstalledPackage {
                name: "dpkg".into(),
                version: "1.21".into(),
                architecture: "amd64".into(),
                source: "dpkg".into(),
            }],
            custom: vec![wit_inventory::CustomItem {
                type_name: "Custom:Rack".into(),
                attributes: vec![("row".into(), "4".into())],
            }],
            warnings: vec!["w".into()],
        });
        assert_eq!(
            to_json(Output::Inventory(inv)).unwrap(),
            json!({
                "os": {
                    "family": "linux", "name": "Debian GNU/Linux", "version": "12",
                    "kernel_version": "6.1.0", "architecture": "x86_64", "hostname": "web-1",
                },
                "packages": [
                    {"name": "dpkg", "version": "1.21", "architecture": "amd64", "source": "dpkg"},
                ],
                "custom": [{"type_name": "Custom:Rack", "attributes": [["row", "4"]]}],
                "warnings": ["w"],
            })
        );
        let request = collect_request(inventory::CollectRequest::from_input(
            &json!({"packages": false}),
        ));
        assert!(!request.packages);
        assert_eq!(request.extra, r#"{"packages":false}"#);
    }

    #[test]
    fn each_plugin_error_case_says_whether_a_retry_can_help() {
        use types::PluginError as E;
        for (e, case, retryable) in [
            (E::Denied("d".into()), PluginErrorKind::Denied, false),
            (
                E::InvalidInput("i".into()),
                PluginErrorKind::InvalidInput,
                false,
            ),
            (
                E::Unavailable("u".into()),
                PluginErrorKind::Unavailable,
                true,
            ),
            (E::TimedOut("t".into()), PluginErrorKind::TimedOut, true),
            (E::Failed("f".into()), PluginErrorKind::Failed, false),
        ] {
            let f = failure(e);
            assert_eq!(f.kind, FailureKind::PluginError);
            assert_eq!((f.plugin_error, f.retryable), (Some(case), retryable));
        }
        let f = task_output("not json").unwrap_err();
        assert!(f.message.contains("not JSON"), "{}", f.message);
        assert_eq!(f.plugin_error, None);
    }
}
