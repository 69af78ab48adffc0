//! A simulated Drover fleet and the benchmark program's building blocks.
//!
//! - [`fleet`]: N real agents in one process, each with its own MQTT connection, data
//!   directory and keys, all sharing one wasm engine ([`drover_agent::daemon::Shared`]).
//!   They enroll through the server's real HTTP endpoint and run
//!   [`drover_agent::daemon::run_with`] unchanged.
//! - [`api`]: a small blocking client for the server's HTTP API.
//! - [`procfs`]: resident memory and CPU time from `/proc`, and `RLIMIT_NOFILE`.
//! - [`report`]: the benchmark's table and JSON.
//! - [`server`]: the real `drover` and `drover-agent` binaries as child processes.
//!
//! Binaries: `drover-sim` runs a fleet until Ctrl-C; `drover-bench` starts its own
//! `drover serve` and measures.
pub mod api;
pub mod fleet;
pub mod procfs;
pub mod report;
pub mod server;

pub use api::Api;
pub use fleet::{Fleet, FleetOptions};
