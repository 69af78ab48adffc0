//! The `task` world of `drover:plugin@0.1.0`: bindings for ../../wit/v0.1.0, and `run`.

use serde_json::json;

wit_bindgen::generate!({
    path: "../../wit/v0.1.0",
    world: "task",
});

use drover::plugin::logging::{self, Level};
use drover::plugin::{host_facts, parameters, process};

use crate::Mode;

struct Legacy;

impl Guest for Legacy {
    fn run(input: String) -> Result<String, PluginError> {
        let mode = crate::parse(&input).map_err(|message| PluginError {
            message,
            retryable: false,
        })?;
        logging::log(Level::Info, "legacy plugin running");
        let output = match mode {
            Mode::Echo(value) => json!({ "echo": value, "contract": "0.1.0" }),
            Mode::Fail(message) => {
                return Err(PluginError {
                    message,
                    retryable: true,
                });
            }
            Mode::Exec { program, args } => {
                let out = process::run(&process::Command {
                    program,
                    args,
                    timeout_ms: None,
                    working_dir: None,
                    env: Vec::new(),
                    run_as: None,
                    stream_output: false,
                })?;
                json!({
                    "exit_code": out.exit_code,
                    "stdout": String::from_utf8_lossy(&out.stdout),
                    "stderr": String::from_utf8_lossy(&out.stderr),
                })
            }
            Mode::Facts => match host_facts::get() {
                Some(f) => json!({ "hostname": f.hostname, "agent_id": f.agent_id }),
                None => serde_json::Value::Null,
            },
            Mode::Param(name) => json!({ "value": parameters::get(&name) }),
        };
        Ok(output.to_string())
    }
}

export!(Legacy);
