//! The fleet's API types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An agent as the server knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Agent {
    /// Id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// OS family.
    pub os: String,
    /// Distribution and version.
    pub os_version: String,
    /// Architecture.
    pub arch: String,
    /// Agent version.
    pub agent_version: String,
    /// Tags: the server's, from the activation it enrolled with and from operators
    /// (`drover agents tag`). Jobs target by these.
    pub tags: BTreeMap<String, String>,
    /// Labels: what the agent says of itself (its config's `[tags]`). Shown, never
    /// targeted by.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Connected now.
    pub online: bool,
    /// First seen, Unix ms.
    pub first_seen_ms: u64,
    /// Last message, Unix ms.
    pub last_seen_ms: u64,
    /// When `online` last changed, Unix ms.
    pub status_changed_ms: u64,
    /// When it was deregistered (its broker credential deleted), Unix ms.
    #[serde(default)]
    pub deregistered_ms: Option<u64>,
}

/// Something an agent reported that belongs to no job target, or a refusal of what it
/// sent (`drover agents events`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentEvent {
    /// Sequence.
    pub id: i64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// The agent.
    pub agent_id: String,
    /// Category: `forged`, `replayed`, `deregistered`, `unenrolled`, `bad-message`,
    /// `refused-envelope`, `unmatched-result`, `refused-fetch`, `rate-limited`, `dropped`
    /// (events not recorded or deleted, and how many), ...
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// Which agent events to read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentEventQuery {
    /// One agent's events.
    pub agent: Option<String>,
    /// At most this many (default 100).
    pub limit: Option<u32>,
}

/// A change of an agent's tags: `remove` first, then `set`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TagChange {
    /// Tags to set (added, or replacing the value of the same key).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl TagChange {
    /// Why the change cannot be made, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        for (k, v) in &self.set {
            if k.is_empty() || k.contains('=') || k.len() > 128 || v.len() > 256 {
                return Err(format!(
                    "tag {k:?}={v:?}: a key is 1 to 128 bytes without '=', a value at most 256"
                ));
            }
        }
        Ok(())
    }
}

/// A new broker credential.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Credentials {
    /// The MQTT username (the agent id).
    pub username: String,
    /// The MQTT password. Shown once; the server keeps only a hash.
    pub password: String,
}

/// What deregistering an agent did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deregistered {
    /// The agent.
    pub id: String,
    /// Whether the embedded broker enforces it: false with an external broker, whose
    /// password and ACL files must be written again (`drover broker acl`).
    pub embedded_broker: bool,
    /// Whether a live connection to the embedded broker was closed.
    pub disconnected: bool,
}

/// An activation: a code agents enroll with.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Activation {
    /// Id, shown to operators.
    pub id: String,
    /// The agent id it is bound to, if any.
    pub agent_id: Option<String>,
    /// Tags enrolled agents get.
    pub tags: BTreeMap<String, String>,
    /// How many agents may enroll with it.
    pub max_uses: u32,
    /// How many have.
    pub uses: u32,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
    /// Revoked, Unix ms.
    pub revoked_ms: Option<u64>,
}

/// A request for an activation.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivationRequest {
    /// Lifetime, seconds.
    pub expires_secs: u64,
    /// How many agents may enroll with it.
    pub max_uses: u32,
    /// Tags enrolled agents get.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Bind it to one agent id.
    #[serde(default)]
    pub agent_id: Option<String>,
}

/// A new activation and its code, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivationCreated {
    /// The activation.
    pub activation: Activation,
    /// The code agents enroll with; the server keeps only a hash.
    pub code: String,
}

/// What revoking an activation did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revoked {
    /// The activation.
    pub revoked: String,
}

/// What rotating the key set did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeysetRotated {
    /// The new version.
    pub version: u64,
    /// How many agents it is being sent to (offline ones get it when they next say
    /// hello).
    pub sent_to: usize,
}
