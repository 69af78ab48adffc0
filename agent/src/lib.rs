//! The Drover agent.
//!
//! - [`daemon`]: connect, announce, route what arrives; [`daemon::Shared`] for agents
//!   that share one process.
//! - [`config`]: configuration file and flags, and the local capability policy.
//! - [`identity`]: the agent's own keys, and enrollment.
//! - [`jobs`]: admission of job envelopes, and the one run path (for envelopes and
//!   local runs alike): plugin install and fetch, the sandboxed run, results, recovery.
//! - [`sandbox`]: wasmtime: the engine, compiled-plugin cache, limits, the plugin
//!   worlds (0.2.0, and 0.1.0 for older plugins) and the host interfaces.
//! - [`durable`]: the outbox, and the state that keeps the agent safe across restarts.
//! - [`facts`]: host facts from `sysinfo`.
pub mod config;
pub mod daemon;
pub mod durable;
pub mod facts;
pub mod identity;
pub mod jobs;
pub mod sandbox;

pub use config::Config;
pub use daemon::run;
