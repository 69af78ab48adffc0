//! The audit log's API types.

use serde::{Deserialize, Serialize};

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Sequence.
    pub id: i64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Who: `operator`, `agent:ID`, `enroll:ACTIVATION`.
    pub actor: String,
    /// What, such as `plugin.publish`, `job.create`, `job.execute`.
    pub action: String,
    /// On what.
    pub target: String,
    /// `ok`, `refused`, `failed`, ...
    pub outcome: String,
    /// Details.
    pub detail: String,
}

/// Which entries to read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    /// Exact actor.
    #[serde(default)]
    pub actor: Option<String>,
    /// Action prefix.
    #[serde(default)]
    pub action: Option<String>,
    /// Exact target.
    #[serde(default)]
    pub target: Option<String>,
    /// Exact outcome.
    #[serde(default)]
    pub outcome: Option<String>,
    /// Not before, Unix ms.
    #[serde(default)]
    pub since_ms: u64,
    /// At most this many (default 100).
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_limit() -> u32 {
    100
}
