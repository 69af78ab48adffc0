//! What an agent says about itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sent on connect: who the agent is and what it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's id.
    pub agent_id: String,
    /// The host name.
    pub hostname: String,
    /// The OS family, such as `linux`.
    pub os: String,
    /// The distribution and version, such as `Debian GNU/Linux 12`.
    pub os_version: String,
    /// The CPU architecture.
    pub arch: String,
    /// The agent's version.
    pub agent_version: String,
    /// Labels the agent gives itself (its config's `[tags]`). Shown, never used to
    /// target jobs: the server's tags for an agent come from its activation and from
    /// operators.
    pub tags: BTreeMap<String, String>,
    /// When the agent process started, Unix milliseconds.
    pub started_at_ms: u64,
    /// The version of the key set the agent trusts.
    #[serde(default)]
    pub keyset_version: u64,
    /// When this hello was signed, Unix milliseconds: it is signed afresh on every
    /// connect, and the server refuses one that is not newer than the last it took (a
    /// replay) or far from its own clock.
    #[serde(default)]
    pub sent_at_ms: u64,
}

/// Presence, published retained; the last will publishes `Offline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Presence {
    /// Connected.
    Online,
    /// Disconnected, cleanly or not.
    Offline,
}
