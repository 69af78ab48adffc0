//! Databases made before numbered migrations (release 0.1): brought, in place, to the
//! last schema that release wrote, which is what every capability's first migration
//! describes. From then on only migrations change the schema.
//!
//! Release 0.1 created its tables with `CREATE TABLE IF NOT EXISTS` and added columns to
//! older databases as it started; a database it left behind may lack some of those
//! columns if it was last opened by an older build. The first migrations create tables
//! only if they are missing, so after this step they find everything in place.

use rusqlite::Connection;

/// Columns release 0.1 added to databases made before them, in the order it added them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("job_targets", "state", "TEXT NOT NULL DEFAULT 'pending'"),
    ("job_targets", "detail", "TEXT"),
    ("job_targets", "dispatched_ms", "INTEGER"),
    ("job_targets", "started_ms", "INTEGER"),
    ("job_targets", "finished_ms", "INTEGER"),
    ("job_targets", "envelope", "BLOB"),
    ("job_targets", "cancel_ms", "INTEGER"),
];

/// Adopts a database from before migrations; does nothing to a new one or to one that
/// has migration history.
pub(super) fn adopt(conn: &mut Connection) -> anyhow::Result<()> {
    let has = |name: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [name],
            |r| r.get(0),
        )
    };
    let migrated: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name LIKE 'schema\\_%' ESCAPE '\\')",
        [],
        |r| r.get(0),
    )?;
    if migrated || !has("job_targets")? {
        return Ok(());
    }
    tracing::info!("adopting a database from before numbered migrations");
    let tx = conn.transaction()?;
    for (table, column, decl) in ADDED_COLUMNS {
        let present = {
            let mut stmt = tx.prepare(&format!("PRAGMA table_info({table})"))?;
            stmt.query_map([], |r| r.get::<_, String>(1))?
                .collect::<Result<Vec<_>, _>>()?
                .iter()
                .any(|c| c == column)
        };
        if present {
            continue;
        }
        tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        if *column == "state" {
            // Targets from before states existed get the state their status implies.
            tx.execute_batch(
                "UPDATE job_targets SET state = CASE status \
                 WHEN 'succeeded' THEN 'success' \
                 WHEN 'failed' THEN 'failed' \
                 WHEN 'rejected' THEN 'failed' \
                 WHEN 'sent' THEN 'delivered' \
                 ELSE 'pending' END",
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}
