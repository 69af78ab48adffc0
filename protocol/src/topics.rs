//! The MQTT topic layout, in one place.
//!
//! Every agent owns one subtree, `drover/v1/agents/{id}/`. Under it, `up/` carries what the
//! agent sends and `down/` what it receives. The broker's ACLs (see `drover`'s embedded
//! broker) are written against these functions, so an agent can reach only its own subtree.

/// The prefix of every Drover topic.
pub const ROOT: &str = "drover/v1";

/// What an agent sends to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Up {
    /// `online`/`offline` presence, retained; the last will sets `offline`.
    Status,
    /// The agent's announcement: identity, host, version, tags.
    Hello,
    /// A job's result.
    Result,
    /// A request for a plugin's chunks.
    Fetch,
    /// A signed heartbeat.
    Heartbeat,
    /// A job's progress: started, and live output while it runs.
    Progress,
}

/// What the control plane sends to an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// A signed job envelope. Never retained.
    Job,
    /// A chunk of a plugin blob.
    Chunk,
    /// The control plane's acknowledgement that a result is stored.
    Ack,
    /// A new signed key set.
    Keyset,
    /// A signed request to stop a job.
    Cancel,
}

impl Up {
    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Up::Status => "status",
            Up::Hello => "hello",
            Up::Result => "result",
            Up::Fetch => "fetch",
            Up::Heartbeat => "heartbeat",
            Up::Progress => "progress",
        }
    }

    /// Parses the last topic level.
    pub fn parse(s: &str) -> Option<Up> {
        Some(match s {
            "status" => Up::Status,
            "hello" => Up::Hello,
            "result" => Up::Result,
            "fetch" => Up::Fetch,
            "heartbeat" => Up::Heartbeat,
            "progress" => Up::Progress,
            _ => return None,
        })
    }
}

impl Down {
    /// Every kind, in the order agents subscribe to them.
    pub const ALL: [Down; 5] = [
        Down::Job,
        Down::Chunk,
        Down::Ack,
        Down::Keyset,
        Down::Cancel,
    ];

    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Down::Job => "job",
            Down::Chunk => "chunk",
            Down::Ack => "ack",
            Down::Keyset => "keyset",
            Down::Cancel => "cancel",
        }
    }

    /// Parses the last topic level.
    pub fn parse(s: &str) -> Option<Down> {
        Some(match s {
            "job" => Down::Job,
            "chunk" => Down::Chunk,
            "ack" => Down::Ack,
            "keyset" => Down::Keyset,
            "cancel" => Down::Cancel,
            _ => return None,
        })
    }
}

/// `drover/v1/agents/{id}/`: everything one agent may touch lives under this prefix.
pub fn agent_prefix(agent_id: &str) -> String {
    format!("{ROOT}/agents/{agent_id}/")
}

/// The topic an agent publishes `kind` on.
pub fn up(agent_id: &str, kind: Up) -> String {
    format!("{ROOT}/agents/{agent_id}/up/{}", kind.as_str())
}

/// The topic the control plane publishes `kind` on for one agent.
pub fn down(agent_id: &str, kind: Down) -> String {
    format!("{ROOT}/agents/{agent_id}/down/{}", kind.as_str())
}

/// What an agent subscribes to: the exact topic of every [`Down`] kind.
///
/// Exact topics, not `down/#`: a broker finds an exact subscription with one lookup,
/// while each wildcard filter must be tested against every publish (with mqtt5 0.49 one
/// by one), so a fleet of wildcard subscribers makes every message cost O(agents).
pub fn down_topics(agent_id: &str) -> Vec<String> {
    Down::ALL.iter().map(|&kind| down(agent_id, kind)).collect()
}

/// Everything sent to one agent, as one wildcard filter. Agents subscribe to
/// [`down_topics`] instead; older agents subscribed to this in their persistent sessions,
/// so agents now unsubscribe from it after every connect.
pub fn down_filter(agent_id: &str) -> String {
    format!("{ROOT}/agents/{agent_id}/down/#")
}

/// The filter the control plane subscribes to: everything every agent sends.
pub const UP_FILTER: &str = "drover/v1/agents/+/up/#";

/// Splits an `up` topic into the agent id and the message kind.
pub fn parse_up(topic: &str) -> Option<(&str, Up)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix("/agents/")?;
    let (agent, rest) = rest.split_once('/')?;
    let kind = rest.strip_prefix("up/")?;
    if !is_valid_agent_id(agent) {
        return None;
    }
    Some((agent, Up::parse(kind)?))
}

/// Splits a `down` topic into the agent id and the message kind.
pub fn parse_down(topic: &str) -> Option<(&str, Down)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix("/agents/")?;
    let (agent, rest) = rest.split_once('/')?;
    let kind = rest.strip_prefix("down/")?;
    if !is_valid_agent_id(agent) {
        return None;
    }
    Some((agent, Down::parse(kind)?))
}

/// Agent ids are 1–64 characters of `[A-Za-z0-9._-]`, never `.` or `..`.
///
/// The restriction keeps ids safe as topic levels (no `/`, `+`, `#`), as file names and
/// as MQTT client ids.
pub fn is_valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_topics_round_trip() {
        for kind in [Up::Status, Up::Hello, Up::Result, Up::Fetch, Up::Heartbeat] {
            let t = up("web-1", kind);
            assert_eq!(parse_up(&t), Some(("web-1", kind)));
            assert_eq!(parse_down(&t), None);
        }
        for kind in Down::ALL {
            let t = down("web-1", kind);
            assert_eq!(parse_down(&t), Some(("web-1", kind)));
            assert_eq!(parse_up(&t), None);
        }
    }

    #[test]
    fn an_agent_subscribes_to_every_down_kind_exactly() {
        // Adding a `Down` variant without listing it in `Down::ALL` would leave agents
        // deaf to it; this match stops compiling when a variant is added.
        let listed = |kind: Down| match kind {
            Down::Job | Down::Chunk | Down::Ack | Down::Keyset | Down::Cancel => {
                Down::ALL.contains(&kind)
            }
        };
        assert!(Down::ALL.into_iter().all(listed));
        assert_eq!(Down::ALL.len(), 5);
        let subs = down_topics("web-1");
        assert_eq!(subs.len(), Down::ALL.len());
        for (t, kind) in subs.iter().zip(Down::ALL) {
            assert!(!t.contains(['+', '#']), "{t} is a wildcard filter");
            assert_eq!(parse_down(t), Some(("web-1", kind)));
        }
    }

    #[test]
    fn hostile_ids_are_refused() {
        for id in ["", ".", "..", "a/b", "+", "#", "a b", &"x".repeat(65)] {
            assert!(!is_valid_agent_id(id), "{id:?} accepted");
        }
        assert_eq!(parse_up("drover/v1/agents/+/up/result"), None);
        assert_eq!(parse_up("drover/v1/agents/a/up/result/extra"), None);
    }
}
