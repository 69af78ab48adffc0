//! The Drover agent.
//!
//! - [`agent`]: the main loop: connect, announce, route messages.
//! - [`config`]: configuration file and flags, and the local capability policy.
//! - [`executor`]: envelope checks, plugin fetch and verification, running, reporting.
//! - [`fetch`]: plugin blobs over MQTT in chunks.
//! - [`runtime`]: the wasmtime sandbox, compiled-plugin cache and limits.
//! - [`capped`]: capped stdout/stderr for plugins.
//! - [`facts`]: host facts from `sysinfo`.
pub mod agent;
pub mod capped;
pub mod config;
pub mod executor;
pub mod facts;
pub mod fetch;
pub mod runtime;

pub use agent::run;
pub use config::Config;
