//! Enrollment: an agent proves it holds an activation code, registers the public keys it
//! made on the device, and learns where and how to connect.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::keyset::KeySet;
use crate::signed::Signed;

/// What an agent sends to enroll.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    /// The activation's id.
    pub activation_id: String,
    /// The activation's secret code.
    pub code: String,
    /// The id the agent asks for; required unless the activation names one.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The agent's Ed25519 key: it signs results and heartbeats.
    pub signing_key: PublicKey,
    /// The agent's X25519 key, hex: secrets are sealed to it.
    pub sealing_key: String,
    /// The host name, for the operator.
    #[serde(default)]
    pub hostname: String,
}

/// What the server answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// The agent's id.
    pub agent_id: String,
    /// The broker to dial.
    pub broker: String,
    /// MQTT username.
    pub username: String,
    /// MQTT password; absent when the agent was already given one.
    #[serde(default)]
    pub password: Option<String>,
    /// The root keys.
    pub roots: Vec<PublicKey>,
    /// Distinct roots that signed the key set.
    pub root_threshold: u32,
    /// The key set to trust.
    #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::SignedDoc))]
    pub keyset: Signed<KeySet>,
    /// Tags the activation gives the agent.
    pub tags: BTreeMap<String, String>,
}

/// A signed sign of life, every few tens of seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent.
    pub agent_id: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
    /// Jobs run since start.
    pub jobs_run: u64,
    /// Jobs refused since start.
    pub jobs_refused: u64,
}

impl crate::signed::Signable for Heartbeat {
    const CONTEXT: &'static str = "agent-heartbeat-v1";
}

impl crate::signed::Signable for crate::agent::Hello {
    const CONTEXT: &'static str = "agent-hello-v1";
}

impl crate::signed::Signable for crate::job::JobResult {
    const CONTEXT: &'static str = "job-result-v1";
}
