//! SQL of the event log: `event_log` and `event_cursors`.

use rusqlite::{OptionalExtension as _, params};

use super::Event;
use crate::store::{Db, Schema, Tx, to_i64, to_u64};

/// The event log's tables.
pub const SCHEMA: Schema = Schema {
    name: "events",
    migrations: &[(
        "V1__event_log",
        include_str!("migrations/V1__event_log.sql"),
    )],
};

/// Appends an event to the log, in the caller's transaction; returns its id.
pub fn append_in(tx: &Tx<'_>, kind: &str, body: &str, at_ms: u64) -> anyhow::Result<i64> {
    tx.prepare_cached("INSERT INTO event_log (at_ms, kind, body) VALUES (?1, ?2, ?3)")?
        .execute(params![to_i64(at_ms), kind, body])?;
    Ok(tx.last_insert_rowid())
}

/// The newest event's id, 0 when there is none.
pub async fn last_id(db: &Db) -> anyhow::Result<i64> {
    Ok(db
        .conn()
        .await
        .query_row("SELECT COALESCE(MAX(id), 0) FROM event_log", [], |r| {
            r.get(0)
        })?)
}

/// Events after `after`, oldest first, at most `limit`.
pub async fn read_after(db: &Db, after: i64, limit: usize) -> anyhow::Result<Vec<Event>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, kind, body FROM event_log WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        Ok(Event {
            id: r.get(0)?,
            at_ms: to_u64(r.get(1)?),
            kind: r.get(2)?,
            body: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A consumer's cursor, if it has one.
pub async fn cursor(db: &Db, consumer: &str) -> anyhow::Result<Option<i64>> {
    Ok(db
        .conn()
        .await
        .prepare_cached("SELECT last_id FROM event_cursors WHERE consumer = ?1")?
        .query_row(params![consumer], |r| r.get(0))
        .optional()?)
}

/// Moves a consumer's cursor forward (never back).
pub async fn set_cursor(db: &Db, consumer: &str, last_id: i64, now: u64) -> anyhow::Result<()> {
    db.conn()
        .await
        .prepare_cached(
            "INSERT INTO event_cursors (consumer, last_id, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(consumer) DO UPDATE SET last_id = MAX(last_id, ?2), updated_ms = ?3",
        )?
        .execute(params![consumer, last_id, to_i64(now)])?;
    Ok(())
}

/// Deletes events up to `upto` (every consumer has handled them) that are older than
/// `before_ms`; returns how many.
pub async fn prune(db: &Db, upto: i64, before_ms: u64) -> anyhow::Result<usize> {
    Ok(db
        .conn()
        .await
        .prepare_cached("DELETE FROM event_log WHERE id <= ?1 AND at_ms < ?2")?
        .execute(params![upto, to_i64(before_ms)])?)
}
