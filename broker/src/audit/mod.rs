//! The audit log: every operator action, enrollment and job execution, appended and
//! never rewritten (`drover audit`, `GET /api/v1/audit`).

use crate::capability::Capability;
use crate::clock::Clock;
use crate::store::{Db, Tx};

pub mod cli;
pub mod routes;
pub mod store;
pub mod types;

pub use types::{AuditEntry, AuditFilter};

/// Writes and reads the audit log; clones share it.
#[derive(Clone, Debug)]
pub struct Audit {
    db: Db,
    clock: Clock,
}

impl Capability for Audit {
    fn routes(&self) -> utoipa_axum::router::OpenApiRouter {
        routes::routes(self.clone())
    }
}

impl Audit {
    /// The log in `db`.
    pub fn new(db: Db, clock: Clock) -> Audit {
        Audit { db, clock }
    }

    /// Appends an entry. A failure to record is logged, not returned: the action it
    /// records has already happened.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: &str,
    ) {
        let now = self.clock.now_ms();
        if let Err(e) = store::append(&self.db, actor, action, target, outcome, detail, now).await {
            tracing::error!(error = %format!("{e:#}"), action, "could not write the audit log");
        }
    }

    /// Appends an entry in the caller's transaction.
    pub fn record_in(tx: &Tx<'_>, entry: &Entry<'_>, now: u64) -> anyhow::Result<()> {
        store::append_in(tx, entry, now)
    }

    /// Entries matching `filter`, newest last.
    pub async fn read(&self, filter: &AuditFilter) -> anyhow::Result<Vec<AuditEntry>> {
        store::read(&self.db, filter).await
    }
}

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Who: `operator`, `agent:ID`, `enroll:ACTIVATION`.
    pub actor: &'a str,
    /// What, such as `job.execute`.
    pub action: &'a str,
    /// On what.
    pub target: &'a str,
    /// `ok`, `refused`, `succeeded`, `failed`, ...
    pub outcome: &'a str,
    /// Details.
    pub detail: &'a str,
}
