//! `drover`: the server side and the operator CLI.
//!
//! The core, bottom up:
//! - [`clock`], [`paths`], [`tokens`], [`rate`]: time, the data directory, random
//!   tokens, allowances per agent.
//! - [`store`]: the database and how each capability's tables evolve.
//! - [`events`]: the durable event log capabilities react to.
//! - [`mqtt`]: the embedded broker, external brokers' files, publishing.
//! - [`trust`]: the key set agents trust.
//!
//! The capabilities, each a folder with its tables, routes, types and CLI groups:
//! - [`audit`]: the audit log.
//! - [`fleet`]: agents, presence, identity, enrollment.
//! - [`plugins`]: the plugin catalogue.
//! - [`jobs`]: the job engine, which never names a feature.
//! - [`run_command`]: Run Command, the first feature on the engine.
//!
//! Composition: [`server`] (`drover serve`), [`ingress`] (agents' messages to the
//! capabilities), [`api`] (the HTTP API and its OpenAPI document), [`capability`] (what
//! a capability brings), [`commands`] (the command line), on [`cli`] (what command
//! groups share).
pub mod api;
pub mod audit;
pub mod capability;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod events;
pub mod fleet;
pub mod ingress;
pub mod jobs;
pub mod mqtt;
pub mod paths;
pub mod plugins;
pub mod rate;
pub mod run_command;
pub mod server;
pub mod store;
pub mod tokens;
pub mod trust;
