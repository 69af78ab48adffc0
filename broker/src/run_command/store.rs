//! SQL of Run Command: `command_results`.

use std::collections::BTreeMap;

use rusqlite::params;

use crate::store::{Db, Schema, to_i64};

/// Run Command's table.
pub const SCHEMA: Schema = Schema {
    name: "run_command",
    migrations: &[(
        "V1__command_results",
        include_str!("migrations/V1__command_results.sql"),
    )],
};

/// What one target's command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// The job.
    pub job_id: String,
    /// The agent.
    pub agent_id: String,
    /// The attempt.
    pub attempt: u32,
    /// The target's final state.
    pub state: String,
    /// Its exit code, when it ran to an end.
    pub exit_code: Option<i64>,
    /// Whether it was stopped before it ended.
    pub partial: bool,
    /// Bytes written to stdout, in all.
    pub stdout_bytes: u64,
    /// Bytes written to stderr, in all.
    pub stderr_bytes: u64,
    /// Whether either stream was cut at the output cap.
    pub truncated: bool,
    /// When the target finished, Unix ms.
    pub finished_ms: u64,
}

/// Records what targets' commands did; one that is recorded already stays as it was
/// (an event handed over twice records nothing new).
pub async fn record(db: &Db, results: &[CommandResult]) -> anyhow::Result<()> {
    let tx = db.begin().await?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO command_results (job_id, agent_id, attempt, state, exit_code, partial, stdout_bytes, stderr_bytes, truncated, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for r in results {
            stmt.execute(params![
                r.job_id,
                r.agent_id,
                r.attempt,
                r.state,
                r.exit_code,
                r.partial,
                to_i64(r.stdout_bytes),
                to_i64(r.stderr_bytes),
                r.truncated,
                to_i64(r.finished_ms)
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// A command's targets per exit code (of those that ran to an end), and how many were
/// stopped with partial output.
pub async fn exit_codes(db: &Db, job_id: &str) -> anyhow::Result<(BTreeMap<String, usize>, usize)> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT exit_code, partial, COUNT(*) FROM command_results WHERE job_id = ?1 AND (exit_code IS NOT NULL OR partial) GROUP BY exit_code, partial",
    )?;
    let rows = stmt.query_map(params![job_id], |r| {
        Ok((
            r.get::<_, Option<i64>>(0)?,
            r.get::<_, bool>(1)?,
            r.get::<_, i64>(2)? as usize,
        ))
    })?;
    let (mut codes, mut partial) = (BTreeMap::new(), 0);
    for row in rows {
        match row? {
            (Some(code), _, n) => *codes.entry(code.to_string()).or_insert(0) += n,
            (None, _, n) => partial += n,
        }
    }
    Ok((codes, partial))
}
