//! A `task` plugin built against the frozen `drover:plugin@0.1.0` contract
//! (`wit/v0.1.0`), whose `plugin-error` is a record of a message and a `retryable` flag.
//! It is a test fixture: it exists to prove that plugins built before 0.2.0 keep running
//! on newer agents. Never deploy it.
//!
//! Input is a JSON object whose `mode` picks what it does:
//!
//! | mode    | parameters (default)                   | returns                                         |
//! |---------|----------------------------------------|-------------------------------------------------|
//! | `echo`  |                                        | `{"echo": <the whole input>, "contract": "0.1.0"}` |
//! | `fail`  | `message` ("asked to fail")            | a retryable error record                        |
//! | `exec`  | `program` ("/bin/echo"), `args` ([])   | `{"exit_code", "stdout", "stderr"}` from the 0.1.0 `process.run`, or its error record as it is |
//! | `facts` |                                        | `{"hostname", "agent_id"}` from `host-facts`, `null` when not granted |
//! | `param` | `name` ("x")                           | `{"value": <string or null>}` from `parameters` |
//!
//! It logs one line through `logging` per run. Anything else is a non-retryable error.
//!
//! The input handling is plain Rust here, tested on the host with
//! `cargo test --target x86_64-unknown-linux-gnu`; the component glue is compiled only
//! for wasm32.

use serde_json::{Map, Value};

#[cfg(target_arch = "wasm32")]
mod component;

/// What the input asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Return the input.
    Echo(Value),
    /// Fail with a retryable error carrying this message.
    Fail(String),
    /// Run a program through `process.run`.
    Exec {
        /// Its absolute path.
        program: String,
        /// Its arguments.
        args: Vec<String>,
    },
    /// Return some host facts.
    Facts,
    /// Return one parameter.
    Param(String),
}

/// Reads the job's input.
pub fn parse(input: &str) -> Result<Mode, String> {
    let value: Value =
        serde_json::from_str(input).map_err(|e| format!("input is not valid JSON: {e}"))?;
    let Some(fields) = value.as_object() else {
        return Err("input must be a JSON object with a \"mode\"".to_owned());
    };
    Ok(match string(fields, "mode", "")? {
        "echo" => Mode::Echo(value.clone()),
        "fail" => Mode::Fail(string(fields, "message", "asked to fail")?.to_owned()),
        "exec" => Mode::Exec {
            program: string(fields, "program", "/bin/echo")?.to_owned(),
            args: match fields.get("args") {
                None => Vec::new(),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_owned)).collect())
                    .ok_or("\"args\" must be a list of strings")?,
            },
        },
        "facts" => Mode::Facts,
        "param" => Mode::Param(string(fields, "name", "x")?.to_owned()),
        "" => return Err("input has no \"mode\"".to_owned()),
        other => return Err(format!("unknown mode {other:?}")),
    })
}

fn string<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
    default: &'a str,
) -> Result<&'a str, String> {
    match fields.get(name) {
        None => Ok(default),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("\"{name}\" must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn modes_are_read_with_their_defaults() {
        assert_eq!(
            parse(r#"{"mode": "echo", "n": 1}"#),
            Ok(Mode::Echo(json!({"mode": "echo", "n": 1})))
        );
        assert_eq!(
            parse(r#"{"mode": "fail"}"#),
            Ok(Mode::Fail("asked to fail".into()))
        );
        assert_eq!(
            parse(r#"{"mode": "exec", "args": ["a b"]}"#),
            Ok(Mode::Exec {
                program: "/bin/echo".into(),
                args: vec!["a b".into()],
            })
        );
        assert_eq!(parse(r#"{"mode": "param"}"#), Ok(Mode::Param("x".into())));
        for (input, why) in [
            ("[]", "JSON object"),
            ("{}", "no \"mode\""),
            (r#"{"mode": "fly"}"#, "unknown mode"),
            (r#"{"mode": "exec", "args": "x"}"#, "\"args\""),
            (r#"{"mode": 1}"#, "\"mode\" must be a string"),
        ] {
            let e = parse(input).unwrap_err();
            assert!(e.contains(why), "{input}: {e}");
        }
    }
}
