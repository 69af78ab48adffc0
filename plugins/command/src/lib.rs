//! Run Command: a `command-runner` plugin that runs a shell script or a command on the
//! host through the agent's `process` import, and returns its exit code and output.
//!
//! # Capabilities
//!
//! It asks for `exec: ["*"]` (any program), so an agent runs it only if its policy lists
//! `exec = ["*"]` too; running as another user also needs that user in the policy's
//! `run_as`. Capabilities are given when the component is signed:
//!
//! ```text
//! drover plugin sign command.wasm --name command --version 1 --world command-runner --exec '*'
//! drover plugin publish command.wasm
//! ```
//!
//! # Request
//!
//! The WIT record `run-command.request` (`wit/run-command.wit`); the agent reads it from
//! the job's input (`drover_protocol::worlds::command::CommandRequest`), refusing input
//! of the wrong shape before this plugin is called. It has exactly one of
//!
//! | field    | runs                                                    |
//! |----------|---------------------------------------------------------|
//! | `script` | `SHELL -c SCRIPT`                                       |
//! | `argv`   | `ARGV[0] ARGV[1..]` directly when `ARGV[0]` is a clean absolute path and no `shell` is given; otherwise `SHELL -c 'exec "$@"' sh ARGV...`: the shell finds the program in `PATH` and passes the arguments through untouched |
//!
//! and, optionally, `shell` (the shell's absolute path, `/bin/sh`), `cwd` (an existing
//! absolute path, `/`), `env` (variables added; `PATH` is [`DEFAULT_PATH`] unless set
//! here), `run-as` (the user to run as) and `stream-output` (whether the agent forwards
//! the output live while it runs). A request this plugin cannot run (both or neither of
//! `argv` and `script`, an empty script or program, a relative shell) is an
//! `invalid-input` error.
//!
//! # Output
//!
//! The WIT record `run-command.output`: the exit code, and each stream's `text` (what
//! the agent kept, up to the job's output limit, as UTF-8 with invalid sequences
//! replaced), `total-bytes` (how much the program wrote in all) and `truncated`.
//! `exit-code` is `-1` when a signal ended the program, and `127` when the shell found
//! no such program (an absolute `argv[0]` that cannot be started is an error that says
//! why). A program that ran and failed is a result, not an error: errors are for a
//! command that could not run (bad input, not granted, could not start) and pass on the
//! agent's. There is no timeout of its own: the job's deadline stops the command and
//! everything it started.
//!
//! The logic is plain Rust here, tested on the host with
//! `cargo test --target x86_64-unknown-linux-gnu`; the component glue is compiled only
//! for wasm32.

#[cfg(target_arch = "wasm32")]
mod component;

/// The shell used unless the request names another.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// `PATH` for the command unless its `env` sets one: the usual directories of a root
/// shell, so that administration tools in `sbin` are found too.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The script that runs `argv`: `exec` replaces the shell with the program, which gets
/// the arguments exactly as given, without any quoting or splitting.
pub const EXEC_ARGV: &str = "exec \"$@\"";

/// What the operator asked to run: the WIT record `run-command.request`, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The program and its arguments; empty when `script` is given.
    pub argv: Vec<String>,
    /// A shell script.
    pub script: Option<String>,
    /// The shell's absolute path.
    pub shell: Option<String>,
    /// The working directory.
    pub cwd: Option<String>,
    /// Environment variables added, in order.
    pub env: Vec<(String, String)>,
    /// The user to run as.
    pub run_as: Option<String>,
    /// Whether to forward output live.
    pub stream_output: bool,
}

/// A command in the shape of the `process` import's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The program's absolute path: the shell, or `argv[0]` run directly.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The working directory; `None` is the agent's default, `/`.
    pub working_dir: Option<String>,
    /// Environment variables, `PATH` included.
    pub env: Vec<(String, String)>,
    /// The user to run as.
    pub run_as: Option<String>,
    /// Whether to forward output live.
    pub stream: bool,
}

/// What to run for `request`, or why it cannot run (an `invalid-input` error).
pub fn plan(request: Request) -> Result<Plan, String> {
    let Request {
        argv,
        script,
        shell,
        cwd,
        mut env,
        run_as,
        stream_output,
    } = request;
    let mut program = shell.clone().unwrap_or_else(|| DEFAULT_SHELL.to_owned());
    if !program.starts_with('/') {
        return Err(format!(
            "\"shell\" must be an absolute path, not {program:?}"
        ));
    }
    let args = match (script, argv.is_empty()) {
        (Some(_), false) => {
            return Err("request has both \"script\" and \"argv\"; give one".to_owned());
        }
        (None, true) => return Err("request has neither \"script\" nor \"argv\"".to_owned()),
        (Some(script), true) => {
            if script.trim().is_empty() {
                return Err("\"script\" is empty".to_owned());
            }
            vec!["-c".to_owned(), script]
        }
        (None, false) => {
            if argv[0].is_empty() {
                return Err("\"argv\" must start with a program name or path".to_owned());
            }
            if shell.is_none() && is_clean_absolute(&argv[0]) {
                // Nothing for a shell to look up: one process fewer to start.
                let mut argv = argv.into_iter();
                program = argv.next().unwrap_or_default();
                argv.collect()
            } else {
                let mut args = vec!["-c".to_owned(), EXEC_ARGV.to_owned(), "sh".to_owned()];
                args.extend(argv);
                args
            }
        }
    };
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, ("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    Ok(Plan {
        program,
        args,
        working_dir: cwd,
        env,
        run_as,
        stream: stream_output,
    })
}

/// `/` followed by non-empty components, none of them `.` or `..`, and no NUL: a path
/// the agent accepts as a program without resolving anything.
fn is_clean_absolute(path: &str) -> bool {
    !path.contains('\0')
        && path.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
        })
}

/// One output stream of a finished command: the WIT record `run-command.captured`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// What the agent kept, as UTF-8 (invalid sequences replaced).
    pub text: String,
    /// How many bytes the program wrote in all.
    pub total_bytes: u64,
    /// Whether `text` is shorter than that.
    pub truncated: bool,
}

impl Captured {
    /// A stream of which the agent kept `kept`, of `total_bytes` written.
    pub fn new(kept: &[u8], total_bytes: u64, truncated: bool) -> Captured {
        Captured {
            text: String::from_utf8_lossy(kept).into_owned(),
            total_bytes,
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> (String, String) {
        ("PATH".to_owned(), DEFAULT_PATH.to_owned())
    }

    fn script(s: &str) -> Request {
        Request {
            script: Some(s.into()),
            stream_output: true,
            ..Request::default()
        }
    }

    fn argv(a: &[&str]) -> Request {
        Request {
            argv: a.iter().map(|s| s.to_string()).collect(),
            stream_output: true,
            ..Request::default()
        }
    }

    #[test]
    fn a_script_runs_in_the_shell_with_defaults() {
        let p = plan(script("echo hi; ls")).unwrap();
        assert_eq!(
            p,
            Plan {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "echo hi; ls".into()],
                working_dir: None,
                env: vec![path()],
                run_as: None,
                stream: true,
            }
        );
    }

    #[test]
    fn argv_goes_through_exec_untouched() {
        let p = plan(Request {
            shell: Some("/bin/bash".into()),
            cwd: Some("/tmp".into()),
            env: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
            run_as: Some("nobody".into()),
            stream_output: false,
            ..argv(&["ls", "-l", "a b", "$HOME", "*"])
        })
        .unwrap();
        assert_eq!(p.program, "/bin/bash");
        assert_eq!(
            p.args,
            ["-c", EXEC_ARGV, "sh", "ls", "-l", "a b", "$HOME", "*"]
        );
        assert_eq!(p.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(
            p.env,
            vec![path(), ("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(p.run_as.as_deref(), Some("nobody"));
        assert!(!p.stream);
    }

    #[test]
    fn an_absolute_program_runs_without_a_shell() {
        let p = plan(argv(&["/bin/echo", "a b", "$HOME"])).unwrap();
        assert_eq!(p.program, "/bin/echo");
        assert_eq!(p.args, ["a b", "$HOME"]);
        // A path the agent would have to resolve, or a shell asked for, keeps the shell.
        for request in [
            argv(&["/bin/../bin/echo", "x"]),
            argv(&["/bin//echo", "x"]),
            argv(&["/bin/echo/", "x"]),
            Request {
                shell: Some("/bin/sh".into()),
                ..argv(&["/bin/echo", "x"])
            },
        ] {
            let p = plan(request.clone()).unwrap();
            assert_eq!(p.program, "/bin/sh", "{request:?}");
            assert_eq!(&p.args[..3], ["-c", EXEC_ARGV, "sh"], "{request:?}");
        }
    }

    #[test]
    fn a_path_in_env_replaces_the_default() {
        let p = plan(Request {
            env: vec![("PATH".into(), "/opt/bin".into())],
            ..script("x")
        })
        .unwrap();
        assert_eq!(p.env, vec![("PATH".into(), "/opt/bin".into())]);
    }

    /// The argv script really passes arguments through: run it with the host's shell.
    #[test]
    #[cfg(unix)]
    fn the_argv_script_preserves_arguments() {
        let p = plan(argv(&["printf", "[%s]", "a b", "$HOME", "*", "'\""])).unwrap();
        let out = std::process::Command::new(&p.program)
            .args(&p.args)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[a b][$HOME][*]['\"]");
    }

    #[test]
    fn requests_that_cannot_run_are_refused_with_a_reason() {
        for (request, why) in [
            (Request::default(), "neither"),
            (
                Request {
                    script: Some("a".into()),
                    ..argv(&["b"])
                },
                "both",
            ),
            (script("  "), "\"script\" is empty"),
            (argv(&[""]), "must start with a program"),
            (
                Request {
                    shell: Some("sh".into()),
                    ..script("x")
                },
                "must be an absolute path",
            ),
        ] {
            let err = plan(request.clone()).unwrap_err();
            assert!(err.contains(why), "{request:?}: {err}");
        }
    }

    #[test]
    fn output_reports_text_totals_and_cuts() {
        assert_eq!(
            Captured::new(b"hello \xff", 5000, true),
            Captured {
                text: "hello \u{fffd}".into(),
                total_bytes: 5000,
                truncated: true,
            }
        );
    }
}
