//! The Drover agent.
//!
//! - [`agent`]: the main loop: connect, announce, route messages.
//! - [`config`]: configuration file and flags, and the local capability policy.
//! - [`executor`]: envelope checks, plugin fetch and verification, running, reporting.
//! - [`fetch`]: plugin blobs over MQTT in chunks.
//! - [`identity`]: the agent's own keys, and enrollment.
//! - [`outbox`]: results on disk until the control plane acknowledges them.
//! - [`state`]: trusted key set, replay and rollback protection, kept on disk.
//! - [`runtime`]: the wasmtime sandbox, compiled-plugin cache and limits.
//! - [`capped`]: capped stdout/stderr for plugins.
//! - [`exec`]: granted programs for the `process` import, killed with their job.
//! - [`net`]: the socket check for granted `host:port` addresses.
//! - [`facts`]: host facts from `sysinfo`.
pub mod agent;
pub mod capped;
pub mod config;
pub mod exec;
pub mod executor;
pub mod facts;
pub mod fetch;
pub mod identity;
pub mod net;
pub mod outbox;
pub mod runtime;
pub mod state;

pub use agent::run;
pub use config::Config;
