//! What every command group shares: flags checked once into types, a client for the
//! server's API, and printing. The groups themselves are their capabilities' (see
//! `commands.rs`).
//!
//! - [`context`]: the data directory, the server, the output format.
//! - [`client`]: the HTTP client for the server's API.
//! - [`args`]: parsing flag values.
//! - [`print`]: tables and JSON.

pub mod args;
pub mod client;
pub mod context;
pub mod print;
