//! The `task` world's glue: bindings for ../../wit, and `run`, which reads the input,
//! runs the command through `process.run` and reports what it did.

wit_bindgen::generate!({
    path: "../../wit",
    world: "task",
});

use drover::plugin::process;

struct Command;

impl Guest for Command {
    fn run(input: String) -> Result<String, PluginError> {
        let request = crate::parse(&input).map_err(|message| PluginError {
            message,
            retryable: false,
        })?;
        let command = process::Command {
            program: request.program,
            args: request.args,
            // The job's deadline stops the command; it needs no timeout of its own.
            timeout_ms: None,
            working_dir: request.working_dir,
            env: request.env,
            run_as: request.run_as,
            stream_output: request.stream,
        };
        // The host's error (not granted, could not start, ...) goes back as it is.
        let out = process::run(&command)?;
        Ok(crate::output(
            out.exit_code,
            crate::Stream {
                kept: &out.stdout,
                total_bytes: out.stdout_bytes,
                truncated: out.stdout_truncated,
            },
            crate::Stream {
                kept: &out.stderr,
                total_bytes: out.stderr_bytes,
                truncated: out.stderr_truncated,
            },
        ))
    }
}

export!(Command);
