//! What every command gets: where the data directory is, which server to talk to, and
//! how to print.

use crate::paths::DataDir;

use super::client::Client;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For programs.
    Json,
}

/// Shared context for commands.
#[derive(Debug)]
pub struct Ctx {
    /// The data directory.
    pub data: DataDir,
    /// `--server`.
    pub server: Option<String>,
    /// `--output`.
    pub output: Output,
}

impl Ctx {
    /// A client for the running server.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::connect(&self.data, self.server.as_deref())
    }
}
