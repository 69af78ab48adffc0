//! `drover`: the server side and the operator CLI.
//!
//! - [`server`]: `drover serve`, wiring everything below together.
//! - [`embedded`]: the embedded MQTT broker, with per-client auth and topic ACLs.
//! - [`credentials`]: broker credentials, checked against the store.
//! - [`enrollment`]: activation codes and agent enrollment.
//! - [`mosquitto`]: password, ACL and settings files for Mosquitto as external broker.
//! - [`control`]: the control plane: signed job envelopes, plugin chunks, results.
//! - [`rollout`]: rate control: max concurrency, max errors, ramp, deadlines.
//! - [`command`]: Run Command: commands as rate-controlled jobs of the command runner.
//! - [`store`]: the SQLite store of agents, plugins, jobs and results.
//! - [`api`]: the HTTP API.
//! - [`client`]: the CLI's HTTP client.
//! - [`cli`]: the command line.
//! - [`paths`]: the data directory layout.
//! - [`trust`]: the root-signed key set agents trust, and its rotation.
pub mod api;
pub mod cli;
pub mod client;
pub mod command;
pub mod control;
pub mod credentials;
pub mod embedded;
pub mod enrollment;
pub mod mosquitto;
pub mod paths;
pub mod rollout;
pub mod server;
pub mod store;
pub mod trust;
