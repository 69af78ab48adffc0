//! Wire types, topics and signing shared by `drover-agent` and `drover`.
//!
//! - [`topics`]: the MQTT topic layout and agent-id rules.
//! - [`keys`]: Ed25519 keys on disk and on the wire.
//! - [`keyset`]: root-signed sets of trusted keys, and their rotation.
//! - [`signed`]: signed documents and their one canonical encoding.
//! - [`manifest`]: plugin manifests and capabilities.
//! - [`job`]: job envelopes, limits and results.
//! - [`chunk`]: plugin blobs in chunks.
//! - [`secret`]: secrets sealed to one agent.
//! - [`agent`]: what an agent announces.
//! - [`worlds`]: the typed inputs and outputs of the plugin worlds in `wit/`.
//! - [`durable`]: crash-safe file writes, for both binaries.
//! - [`enroll`]: enrollment, heartbeats, and what agents sign.
//! - `link` (feature `link`): the MQTT connection with reconnect and backoff.
//! - `telemetry` (feature `telemetry`): the one logging setup of every binary.
//!
//! Everything here decodes untrusted bytes; nothing here panics on them.
pub mod agent;
pub mod chunk;
pub mod durable;
pub mod enroll;
pub mod job;
pub mod keys;
pub mod keyset;
pub mod manifest;
pub mod secret;
pub mod signed;
pub mod topics;
pub mod worlds;

/// The current time as Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The current time as Unix seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[cfg(feature = "link")]
pub mod link;
#[cfg(feature = "openapi")]
pub mod openapi;
#[cfg(feature = "telemetry")]
pub mod telemetry;
