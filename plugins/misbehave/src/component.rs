//! The `task` world's glue: bindings for ../../wit (`drover:plugin@0.2.0`), and `run`, which reads the input and
//! dispatches to [`crate::modes`].

use std::time::Duration;

use serde_json::{Value, json};

use crate::modes::{self, MIB};

wit_bindgen::generate!({
    path: "../../wit",
    world: "task",
});

use drover::plugin::host_facts;
use drover::plugin::logging::{self, Level};
use drover::plugin::{parameters, process};

struct Misbehave;

impl Guest for Misbehave {
    fn run(input: String) -> Result<String, PluginError> {
        run(&input).map_err(|failure| match failure {
            Failure::Asked => PluginError::Unavailable("asked to fail".to_owned()),
            Failure::Input(message) => PluginError::InvalidInput(message),
            Failure::Failed(message) => PluginError::Failed(message),
            Failure::Host(e) => e,
        })
    }
}

export!(Misbehave);

enum Failure {
    /// Mode `fail`: a retryable error.
    Asked,
    /// Bad input: a mode or parameter it does not know.
    Input(String),
    /// An operation that failed: opening a file, connecting.
    Failed(String),
    /// An error a host import returned, passed through unchanged.
    Host(PluginError),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Input(message)
    }
}

fn run(input: &str) -> Result<String, Failure> {
    let input: Value =
        serde_json::from_str(input).map_err(|e| format!("input is not valid JSON: {e}"))?;
    let Some(args) = input.as_object() else {
        return Err(Failure::Input(
            "input must be a JSON object with a \"mode\"".to_owned(),
        ));
    };
    let mode = match args.get("mode") {
        Some(Value::String(mode)) => mode.as_str(),
        Some(_) => return Err(Failure::Input("\"mode\" must be a string".to_owned())),
        None => return Err(Failure::Input("input has no \"mode\"".to_owned())),
    };
    let output = match mode {
        "echo" => json!({ "echo": input }),
        "spin" => modes::spin(),
        "sleep" => {
            let seconds = modes::number(args, "seconds", 3600.0)?;
            let duration = Duration::try_from_secs_f64(seconds)
                .map_err(|_| "\"seconds\" must be a non-negative number of seconds".to_owned())?;
            // Blocks in wasi:clocks' monotonic-clock subscribe + wasi:io/poll.
            std::thread::sleep(duration);
            json!({ "slept": seconds })
        }
        "grow" => json!({ "allocated_mib": modes::grow(modes::count(args, "mib", 4096)?) }),
        "open" => {
            let path = modes::string(args, "path", "/etc/hostname")?;
            let bytes = std::fs::read(path)
                .map_err(|e| Failure::Failed(format!("could not open {path}: {e}")))?;
            json!({ "read_bytes": bytes.len() })
        }
        "spew" => {
            let bytes = modes::count(args, "bytes", 8 * MIB as u64)?;
            json!({ "written": modes::spew(&mut std::io::stdout(), bytes) })
        }
        "stderr" => {
            let bytes = modes::count(args, "bytes", 8 * MIB as u64)?;
            json!({ "written": modes::spew(&mut std::io::stderr(), bytes) })
        }
        "log" => {
            let message = modes::string(args, "message", "hello from misbehave")?;
            logging::log(Level::Info, message);
            json!({})
        }
        // Keys are the WIT field names in snake_case, as Drover's JSON elsewhere.
        "facts" => match host_facts::get() {
            Some(f) => json!({
                "hostname": f.hostname,
                "os_family": f.os_family,
                "os_name": f.os_name,
                "os_version": f.os_version,
                "kernel_version": f.kernel_version,
                "architecture": f.architecture,
                "cpu_count": f.cpu_count,
                "memory_total_bytes": f.memory_total_bytes,
                "uptime_seconds": f.uptime_seconds,
                "agent_id": f.agent_id,
            }),
            None => Value::Null,
        },
        "exec" => {
            let request = process::Command {
                program: modes::string(args, "program", "/usr/bin/uptime")?.to_owned(),
                args: modes::strings(args, "args")?,
                timeout_ms: modes::optional_u32(args, "timeout_ms")?,
                working_dir: None,
                env: Vec::new(),
                run_as: None,
                stream_output: false,
            };
            // The host's error goes back as it is, case and all.
            let out = process::run(&request).map_err(Failure::Host)?;
            json!({
                "exit_code": out.exit_code,
                "stdout": String::from_utf8_lossy(&out.stdout),
                "stderr": String::from_utf8_lossy(&out.stderr),
                "stdout_truncated": out.stdout_truncated,
                "stderr_truncated": out.stderr_truncated,
            })
        }
        "connect" => {
            modes::connect(modes::string(args, "addr", "127.0.0.1:80")?)
                .map_err(Failure::Failed)?;
            json!({ "connected": true })
        }
        "param" => {
            let name = modes::string(args, "name", "x")?;
            json!({ "value": parameters::get(name) })
        }
        "param_digest" => {
            // Proves a (secret) parameter arrived without putting it in the result.
            let name = modes::string(args, "name", "x")?;
            match parameters::get(name) {
                Some(v) => json!({ "len": v.len(), "sha256": modes::sha256_hex(v.as_bytes()) }),
                None => Value::Null,
            }
        }
        "fail" => return Err(Failure::Asked),
        "trap" => panic!("asked to trap"),
        other => return Err(Failure::Input(format!("unknown mode {other:?}"))),
    };
    Ok(output.to_string())
}
