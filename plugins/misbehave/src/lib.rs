//! A deliberately hostile `task` plugin, for testing the agent's sandbox and limits.
//! It is a test fixture: never sign it with a production key or deploy it.
//!
//! Input is a JSON object whose `mode` picks the behaviour:
//!
//! | mode     | parameters (default)            | does                                               |
//! |----------|---------------------------------|----------------------------------------------------|
//! | `echo`   |                                 | returns `{"echo": <the whole input document>}`     |
//! | `spin`   |                                 | burns CPU forever                                  |
//! | `sleep`  | `seconds` (3600)                | sleeps in WASI's clock, then `{"slept": seconds}`  |
//! | `grow`   | `mib` (4096)                    | allocates and fills 1 MiB blocks, keeping them all |
//! | `open`   | `path` ("/etc/hostname")        | reads a file: `{"read_bytes": n}` or an error      |
//! | `spew`   | `bytes` (8 MiB)                 | writes lines to stdout: `{"written": n}`           |
//! | `stderr` | `bytes` (8 MiB)                 | the same to stderr                                 |
//! | `log`    | `message` ("hello from misbehave") | one info line through `logging`, returns `{}`   |
//! | `facts`  |                                 | `host-facts.get()` as JSON, `null` when not granted|
//! | `exec`   | `program` ("/usr/bin/uptime"), `args` ([]), `timeout_ms` | `process.run`: `{"exit_code", "stdout", "stderr", "stdout_truncated", "stderr_truncated"}`, or the host's error |
//! | `connect`| `addr` ("127.0.0.1:80")         | opens a TCP connection: `{"connected": true}` or an error |
//! | `param`  | `name` ("x")                    | `parameters.get(name)`: `{"value": <string or null>}` |
//! | `param_digest` | `name` ("x")              | `{"len", "sha256"}` of the parameter, never its value |
//! | `fail`   |                                 | a retryable error: `unavailable("asked to fail")`  |
//! | `trap`   |                                 | panics; with `panic = "abort"` that is a trap      |
//!
//! Anything else, or input that is not a JSON object, is an `invalid-input` error; a file
//! or connection that fails is `failed`; a host import's error is passed through.

//! The behaviours are plain Rust in [`modes`], tested on the host with
//! `cargo test --target x86_64-unknown-linux-gnu`; the component glue that reads the
//! input and dispatches is compiled only for wasm32.

pub mod modes;

#[cfg(target_arch = "wasm32")]
mod component;
