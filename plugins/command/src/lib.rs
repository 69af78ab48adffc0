//! Run Command: a `task` plugin that runs a shell script or a command on the host
//! through the agent's `process` import, and returns its exit code and output.
//!
//! # Capabilities
//!
//! It asks for `exec: ["*"]` (any program), so an agent runs it only if its policy lists
//! `exec = ["*"]` too; running as another user also needs that user in the policy's
//! `run_as`. Capabilities are given when the component is signed:
//!
//! ```text
//! drover plugin sign command.wasm --name command --version 1 --world task --exec '*'
//! drover plugin publish command.wasm
//! ```
//!
//! # Input
//!
//! A JSON object with exactly one of
//!
//! | field    | type              | runs                                                    |
//! |----------|-------------------|---------------------------------------------------------|
//! | `script` | string            | `SHELL -c SCRIPT`                                       |
//! | `argv`   | non-empty strings | `ARGV[0] ARGV[1..]` directly when `ARGV[0]` is a clean absolute path and no `shell` is given; otherwise `SHELL -c 'exec "$@"' sh ARGV...`: the shell finds the program in `PATH` and passes the arguments through untouched |
//!
//! and, optionally,
//!
//! | field    | type (default)           | meaning                                                 |
//! |----------|--------------------------|---------------------------------------------------------|
//! | `shell`  | string (`"/bin/sh"`)     | the shell's absolute path                               |
//! | `cwd`    | string (`/`)             | the working directory: an existing absolute path       |
//! | `env`    | object of strings (`{}`) | environment variables; `PATH` is [`DEFAULT_PATH`] unless set here |
//! | `run_as` | string (the agent's user)| the user to run as                                      |
//! | `stream` | bool (`true`)            | whether the agent forwards the output live while it runs |
//!
//! Other fields are refused, so a misspelt one is not silently ignored.
//!
//! # Output
//!
//! ```json
//! {"exit_code": 0,
//!  "stdout": {"text": "...", "total_bytes": 12, "truncated": false},
//!  "stderr": {"text": "", "total_bytes": 0, "truncated": false}}
//! ```
//!
//! `text` is what the agent kept of the stream (up to the job's output limit), as UTF-8
//! with invalid sequences replaced; `total_bytes` is how much the program wrote in all.
//! `exit_code` is `-1` when a signal ended the program, and `127` when the shell found
//! no such program (an absolute `argv[0]` that cannot be started is an error that says
//! why). A program that ran and failed is a result, not an error: errors are
//! for a command that could not run (bad input, not granted, could not start) and pass on
//! the agent's message. There is no timeout of its own: the job's deadline stops the
//! command and everything it started.
//!
//! The logic is plain Rust here, tested on the host with
//! `cargo test --target x86_64-unknown-linux-gnu`; the component glue is compiled only
//! for wasm32.

use serde_json::{Map, Value, json};

#[cfg(target_arch = "wasm32")]
mod component;

/// The shell used unless the input names another.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// `PATH` for the command unless its `env` sets one: the usual directories of a root
/// shell, so that administration tools in `sbin` are found too.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The script that runs `argv`: `exec` replaces the shell with the program, which gets
/// the arguments exactly as given, without any quoting or splitting.
pub const EXEC_ARGV: &str = "exec \"$@\"";

/// Input fields this plugin understands.
const FIELDS: [&str; 7] = ["argv", "script", "shell", "cwd", "env", "run_as", "stream"];

/// A command, read from the input, in the shape of the `process` import's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The shell's absolute path.
    pub program: String,
    /// The shell's arguments.
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

/// Reads the job's input.
pub fn parse(input: &str) -> Result<Request, String> {
    let value: Value =
        serde_json::from_str(input).map_err(|e| format!("input is not valid JSON: {e}"))?;
    let Some(fields) = value.as_object() else {
        return Err("input must be a JSON object with \"script\" or \"argv\"".to_owned());
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "input field {unknown:?} is unknown; expected {}",
            FIELDS.join(", ")
        ));
    }
    let shell = optional_string(fields, "shell")?;
    let mut program = shell.unwrap_or(DEFAULT_SHELL).to_owned();
    if !program.starts_with('/') {
        return Err(format!(
            "\"shell\" must be an absolute path, not {program:?}"
        ));
    }
    let args = match (fields.get("script"), fields.get("argv")) {
        (Some(_), Some(_)) => {
            return Err("input has both \"script\" and \"argv\"; give one".to_owned());
        }
        (None, None) => return Err("input has neither \"script\" nor \"argv\"".to_owned()),
        (Some(script), None) => match script.as_str() {
            Some(s) if !s.trim().is_empty() => vec!["-c".to_owned(), s.to_owned()],
            Some(_) => return Err("\"script\" is empty".to_owned()),
            None => return Err("\"script\" must be a string".to_owned()),
        },
        (None, Some(argv)) => {
            let argv = strings(argv).ok_or("\"argv\" must be a list of strings")?;
            if argv.first().is_none_or(|p| p.is_empty()) {
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
    let mut env = match fields.get("env") {
        None => Vec::new(),
        Some(Value::Object(vars)) => vars
            .iter()
            .map(|(k, v)| match v {
                Value::String(v) => Ok((k.clone(), v.clone())),
                _ => Err(format!("\"env\" value of {k:?} must be a string")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("\"env\" must be an object of strings".to_owned()),
    };
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, ("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    let stream = match fields.get("stream") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("\"stream\" must be true or false".to_owned()),
    };
    Ok(Request {
        program,
        args,
        working_dir: optional_string(fields, "cwd")?.map(str::to_owned),
        env,
        run_as: optional_string(fields, "run_as")?.map(str::to_owned),
        stream,
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

/// One output stream of a finished command.
#[derive(Debug, Clone, Copy)]
pub struct Stream<'a> {
    /// What the agent kept.
    pub kept: &'a [u8],
    /// How many bytes the program wrote in all.
    pub total_bytes: u64,
    /// Whether `kept` is shorter than that.
    pub truncated: bool,
}

impl Stream<'_> {
    fn to_json(self) -> Value {
        json!({
            "text": String::from_utf8_lossy(self.kept),
            "total_bytes": self.total_bytes,
            "truncated": self.truncated,
        })
    }
}

/// The task's result for a command that ran.
pub fn output(exit_code: i32, stdout: Stream<'_>, stderr: Stream<'_>) -> String {
    json!({
        "exit_code": exit_code,
        "stdout": stdout.to_json(),
        "stderr": stderr.to_json(),
    })
    .to_string()
}

fn optional_string<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, String> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("\"{name}\" must be a string")),
    }
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> (String, String) {
        ("PATH".to_owned(), DEFAULT_PATH.to_owned())
    }

    #[test]
    fn a_script_runs_in_the_shell_with_defaults() {
        let r = parse(r#"{"script": "echo hi; ls"}"#).unwrap();
        assert_eq!(
            r,
            Request {
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
        let r = parse(
            r#"{"argv": ["ls", "-l", "a b", "$HOME", "*"], "shell": "/bin/bash",
                "cwd": "/tmp", "env": {"B": "2", "A": "1"}, "run_as": "nobody",
                "stream": false}"#,
        )
        .unwrap();
        assert_eq!(r.program, "/bin/bash");
        assert_eq!(
            r.args,
            ["-c", EXEC_ARGV, "sh", "ls", "-l", "a b", "$HOME", "*"]
        );
        assert_eq!(r.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(
            r.env,
            vec![path(), ("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(r.run_as.as_deref(), Some("nobody"));
        assert!(!r.stream);
    }

    #[test]
    fn an_absolute_program_runs_without_a_shell() {
        let r = parse(r#"{"argv": ["/bin/echo", "a b", "$HOME"]}"#).unwrap();
        assert_eq!(r.program, "/bin/echo");
        assert_eq!(r.args, ["a b", "$HOME"]);
        // A path the agent would have to resolve, or a shell asked for, keeps the shell.
        for input in [
            r#"{"argv": ["/bin/../bin/echo", "x"]}"#,
            r#"{"argv": ["/bin//echo", "x"]}"#,
            r#"{"argv": ["/bin/echo/", "x"]}"#,
            r#"{"argv": ["/bin/echo", "x"], "shell": "/bin/sh"}"#,
        ] {
            let r = parse(input).unwrap();
            assert_eq!(r.program, "/bin/sh", "{input}");
            assert_eq!(&r.args[..3], ["-c", EXEC_ARGV, "sh"], "{input}");
        }
    }

    #[test]
    fn a_path_in_env_replaces_the_default() {
        let r = parse(r#"{"script": "x", "env": {"PATH": "/opt/bin"}}"#).unwrap();
        assert_eq!(r.env, vec![("PATH".into(), "/opt/bin".into())]);
    }

    /// The argv script really passes arguments through: run it with the host's shell.
    #[test]
    #[cfg(unix)]
    fn the_argv_script_preserves_arguments() {
        let r = parse(r#"{"argv": ["printf", "[%s]", "a b", "$HOME", "*", "'\""]}"#).unwrap();
        let out = std::process::Command::new(&r.program)
            .args(&r.args)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[a b][$HOME][*]['\"]");
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        for (input, why) in [
            ("not json", "not valid JSON"),
            ("[1]", "must be a JSON object"),
            ("{}", "neither"),
            (r#"{"script": "a", "argv": ["b"]}"#, "both"),
            (r#"{"script": 1}"#, "\"script\" must be a string"),
            (r#"{"script": "  "}"#, "\"script\" is empty"),
            (r#"{"argv": "ls -l"}"#, "\"argv\" must be a list of strings"),
            (
                r#"{"argv": ["ls", 1]}"#,
                "\"argv\" must be a list of strings",
            ),
            (r#"{"argv": []}"#, "must start with a program"),
            (r#"{"argv": [""]}"#, "must start with a program"),
            (
                r#"{"script": "x", "shell": "sh"}"#,
                "must be an absolute path",
            ),
            (
                r#"{"script": "x", "env": ["A=1"]}"#,
                "\"env\" must be an object",
            ),
            (
                r#"{"script": "x", "env": {"A": 1}}"#,
                "\"env\" value of \"A\"",
            ),
            (r#"{"script": "x", "cwd": 1}"#, "\"cwd\" must be a string"),
            (
                r#"{"script": "x", "run_as": 0}"#,
                "\"run_as\" must be a string",
            ),
            (
                r#"{"script": "x", "stream": "yes"}"#,
                "\"stream\" must be true or false",
            ),
            (r#"{"script": "x", "timeout": 5}"#, "\"timeout\" is unknown"),
        ] {
            let err = parse(input).unwrap_err();
            assert!(err.contains(why), "{input}: {err}");
        }
    }

    #[test]
    fn output_reports_text_totals_and_cuts() {
        let out = output(
            3,
            Stream {
                kept: b"hello \xff",
                total_bytes: 5000,
                truncated: true,
            },
            Stream {
                kept: b"",
                total_bytes: 0,
                truncated: false,
            },
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!({
                "exit_code": 3,
                "stdout": {"text": "hello \u{fffd}", "total_bytes": 5000, "truncated": true},
                "stderr": {"text": "", "total_bytes": 0, "truncated": false},
            })
        );
    }
}
