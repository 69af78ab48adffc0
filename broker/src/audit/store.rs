//! SQL of the audit log: `audit`.

use rusqlite::params;

use super::{AuditEntry, AuditFilter, Entry};
use crate::store::{Db, Schema, Tx, to_i64, to_u64};

/// The audit log's table.
pub const SCHEMA: Schema = Schema {
    name: "audit",
    migrations: &[("V1__audit", include_str!("migrations/V1__audit.sql"))],
};

const INSERT: &str = "INSERT INTO audit (at_ms, actor, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Appends an entry.
pub async fn append(
    db: &Db,
    actor: &str,
    action: &str,
    target: &str,
    outcome: &str,
    detail: &str,
    now: u64,
) -> anyhow::Result<()> {
    db.conn().await.prepare_cached(INSERT)?.execute(params![
        to_i64(now),
        actor,
        action,
        target,
        outcome,
        detail
    ])?;
    Ok(())
}

/// Appends an entry in the caller's transaction.
pub fn append_in(tx: &Tx<'_>, e: &Entry<'_>, now: u64) -> anyhow::Result<()> {
    tx.prepare_cached(INSERT)?.execute(params![
        to_i64(now),
        e.actor,
        e.action,
        e.target,
        e.outcome,
        e.detail
    ])?;
    Ok(())
}

/// Entries matching `f`, newest last.
pub async fn read(db: &Db, f: &AuditFilter) -> anyhow::Result<Vec<AuditEntry>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, actor, action, target, outcome, detail FROM audit
         WHERE (?1 IS NULL OR actor = ?1) AND (?2 IS NULL OR action LIKE ?2 || '%')
           AND (?3 IS NULL OR target = ?3) AND (?4 IS NULL OR outcome = ?4) AND at_ms >= ?5
         ORDER BY id DESC LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![
            f.actor,
            f.action,
            f.target,
            f.outcome,
            to_i64(f.since_ms),
            f.limit
        ],
        |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                at_ms: to_u64(r.get(1)?),
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                outcome: r.get(5)?,
                detail: r.get(6)?,
            })
        },
    )?;
    let mut v: Vec<AuditEntry> = rows.collect::<Result<_, _>>()?;
    v.reverse();
    Ok(v)
}
