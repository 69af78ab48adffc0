//! The `command-runner` world's glue: bindings for ../../wit, and `run`, which plans the
//! command, runs it through `process.run` and reports what it did.

wit_bindgen::generate!({
    path: "../../wit",
    world: "command-runner",
});

use drover::plugin::process;
use drover::plugin::run_command::Captured;

struct Command;

impl Guest for Command {
    fn run(request: Request) -> Result<Output, PluginError> {
        let Request {
            argv,
            script,
            shell,
            cwd,
            env,
            run_as,
            stream_output,
        } = request;
        let plan = crate::plan(crate::Request {
            argv,
            script,
            shell,
            cwd,
            env,
            run_as,
            stream_output,
        })
        .map_err(PluginError::InvalidInput)?;
        let crate::Plan {
            program,
            args,
            working_dir,
            env,
            run_as,
            stream,
        } = plan;
        let command = process::Command {
            program,
            args,
            // The job's deadline stops the command; it needs no timeout of its own.
            timeout_ms: None,
            working_dir,
            env,
            run_as,
            stream_output: stream,
        };
        // The host's error (not granted, could not start, ...) goes back as it is.
        let out = process::run(&command)?;
        let captured = |kept: &[u8], total_bytes, truncated| {
            let crate::Captured {
                text,
                total_bytes,
                truncated,
            } = crate::Captured::new(kept, total_bytes, truncated);
            Captured {
                text,
                total_bytes,
                truncated,
            }
        };
        Ok(Output {
            exit_code: out.exit_code,
            stdout: captured(&out.stdout, out.stdout_bytes, out.stdout_truncated),
            stderr: captured(&out.stderr, out.stderr_bytes, out.stderr_truncated),
        })
    }
}

export!(Command);
