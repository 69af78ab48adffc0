//! Agent lifecycle events: what the fleet tells other capabilities through the event
//! log, in the same transaction as the change.

use serde::{Deserialize, Serialize};

use crate::events::Event;

/// What happened to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Lifecycle {
    /// It enrolled its keys with an activation.
    Enrolled {
        /// The agent.
        agent_id: String,
        /// The activation it used.
        activation_id: String,
        /// Its tags, from the activation.
        tags: std::collections::BTreeMap<String, String>,
    },
    /// It said hello on a new connection: it is online, and anything sent to it before
    /// `since_ms` may have been lost with an earlier connection.
    Online {
        /// The agent.
        agent_id: String,
        /// When it said hello, Unix ms (the server's clock).
        since_ms: u64,
        /// The key set version it holds.
        keyset_version: u64,
    },
    /// Its connection ended.
    Offline {
        /// The agent.
        agent_id: String,
    },
    /// An operator deregistered it: it gets nothing more.
    Deregistered {
        /// The agent.
        agent_id: String,
    },
}

/// Every lifecycle event's kind starts with this.
pub const PREFIX: &str = "agent.";

impl Lifecycle {
    /// The event's kind in the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Lifecycle::Enrolled { .. } => "agent.enrolled",
            Lifecycle::Online { .. } => "agent.online",
            Lifecycle::Offline { .. } => "agent.offline",
            Lifecycle::Deregistered { .. } => "agent.deregistered",
        }
    }

    /// The agent it is about.
    pub fn agent_id(&self) -> &str {
        match self {
            Lifecycle::Enrolled { agent_id, .. }
            | Lifecycle::Online { agent_id, .. }
            | Lifecycle::Offline { agent_id }
            | Lifecycle::Deregistered { agent_id } => agent_id,
        }
    }

    /// Reads a lifecycle event from the log; None for events of other kinds.
    pub fn from_event(e: &Event) -> Option<anyhow::Result<Lifecycle>> {
        e.kind.starts_with(PREFIX).then(|| e.decode())
    }
}
