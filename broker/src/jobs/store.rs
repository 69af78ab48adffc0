//! SQL of the job engine: `jobs`, `job_targets` and `rollouts`.
//!
//! A target's `envelope` holds its signed envelope from the moment it is sent until its
//! agent answers, and `cancel_ms` a cancel request not yet answered: every statement
//! that answers a target (started, a result, settled) clears what it no longer needs of
//! them, so a value present means "still owed". `sealed` holds the target's secret
//! parameters, sealed to its agent.

use std::collections::{BTreeMap, HashMap};

use drover_protocol::job::JobResult;
use drover_protocol::manifest::World;
use drover_protocol::secret::SealedBox;
use rusqlite::{OptionalExtension as _, params};

use super::events::{TARGET_FINISHED, TargetFinished};
use super::types::{Job, RolloutInfo, Target, TargetState};
use crate::audit::{Audit, Entry};
use crate::events::EventLog;
use crate::store::{Db, Schema, Tx, opt_u64, to_i64, to_u64};

/// The engine's tables.
pub const SCHEMA: Schema = Schema {
    name: "jobs",
    migrations: &[
        ("V1__jobs", include_str!("migrations/V1__jobs.sql")),
        (
            "V2__worlds_and_sealed_parameters",
            include_str!("migrations/V2__worlds_and_sealed_parameters.sql"),
        ),
    ],
};

/// A target without its result: agent, state, detail, and whether it is done.
pub type TargetBrief = (String, TargetState, Option<String>, bool);

/// What recording a result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stored as the target's result, which put it in this state; the `finished` event
    /// has this id.
    Stored(TargetState, Option<String>, i64),
    /// The target already had a result for this attempt.
    Duplicate,
    /// No such job target.
    NoTarget,
}

const JOB_COLUMNS: &str = "id, plugin, version, targets, input, created_ms, expires_ms, world";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        plugin: r.get(1)?,
        version: to_u64(r.get(2)?),
        targets: r.get(3)?,
        input: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or(serde_json::Value::Null),
        created_ms: to_u64(r.get(5)?),
        expires_ms: to_u64(r.get(6)?),
        world: r.get(7)?,
    })
}

/// Stores a job, its targets (all `pending`, attempt 1, each with its sealed secrets)
/// and its rollout, in one transaction.
pub async fn create(
    db: &Db,
    job: &Job,
    agents: &[String],
    sealed: &HashMap<String, BTreeMap<String, SealedBox>>,
    rollout: &RolloutInfo,
) -> anyhow::Result<()> {
    let tx = db.begin().await?;
    tx.prepare_cached(
        "INSERT INTO jobs (id, plugin, version, targets, input, created_ms, expires_ms, world) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        job.id,
        job.plugin,
        to_i64(job.version),
        job.targets,
        job.input.to_string(),
        to_i64(job.created_ms),
        to_i64(job.expires_ms),
        job.world
    ])?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO job_targets (job_id, agent_id, attempt, status, updated_ms, sealed) VALUES (?1, ?2, 1, 'pending', ?3, ?4)",
        )?;
        for a in agents {
            let secrets = match sealed.get(a) {
                Some(s) if !s.is_empty() => Some(serde_json::to_string(s)?),
                _ => None,
            };
            stmt.execute(params![job.id, a, to_i64(job.created_ms), secrets])?;
        }
    }
    tx.prepare_cached("INSERT INTO rollouts (job_id, spec, created_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![
            rollout.job_id,
            serde_json::to_string(&rollout.spec)?,
            to_i64(rollout.created_ms)
        ])?;
    tx.commit()?;
    Ok(())
}

/// The secret parameters of `agents`' targets of a job, sealed to each agent.
pub async fn sealed_parameters(
    db: &Db,
    job_id: &str,
    agents: &[&str],
) -> anyhow::Result<HashMap<String, BTreeMap<String, SealedBox>>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT sealed FROM job_targets WHERE job_id = ?1 AND agent_id = ?2 AND sealed IS NOT NULL",
    )?;
    let mut out = HashMap::new();
    for a in agents {
        if let Some(text) = stmt
            .query_row(params![job_id, a], |r| r.get::<_, String>(0))
            .optional()?
        {
            out.insert(a.to_string(), serde_json::from_str(&text)?);
        }
    }
    Ok(out)
}

/// Marks targets of one job as sent, in one transaction, keeping each target's signed
/// envelope (agent, body) until the agent answers.
pub async fn mark_sent(
    db: &Db,
    job_id: &str,
    sent: &[(&str, &[u8])],
    now: u64,
) -> anyhow::Result<()> {
    let tx = db.begin().await?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE job_targets SET status = 'sent', state = 'delivered', dispatched_ms = ?3, updated_ms = ?3, envelope = ?4 WHERE job_id = ?1 AND agent_id = ?2 AND status = 'pending' AND state = 'pending'",
        )?;
        for (agent, envelope) in sent {
            stmt.execute(params![job_id, agent, to_i64(now), envelope])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The signed envelopes sent to `agent_id` before `sent_before` that it has not
/// answered, of jobs not yet expired at `now`, oldest job first.
pub async fn unanswered_envelopes(
    db: &Db,
    agent_id: &str,
    sent_before: u64,
    now: u64,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT t.job_id, t.envelope FROM job_targets t JOIN jobs j ON j.id = t.job_id \
         WHERE t.agent_id = ?1 AND t.envelope IS NOT NULL AND t.dispatched_ms < ?2 AND j.expires_ms > ?3 \
         ORDER BY t.job_id",
    )?;
    let rows = stmt.query_map(params![agent_id, to_i64(sent_before), to_i64(now)], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Notes that a cancel request went to `agent_id` for its target of `job_id`, if that
/// target is still open.
pub async fn mark_cancel_sent(
    db: &Db,
    job_id: &str,
    agent_id: &str,
    now: u64,
) -> anyhow::Result<()> {
    db.conn().await.prepare_cached(
        "UPDATE job_targets SET cancel_ms = ?3 WHERE job_id = ?1 AND agent_id = ?2 AND result IS NULL AND state IN ('pending', 'delivered', 'in_progress')",
    )?
    .execute(params![job_id, agent_id, to_i64(now)])?;
    Ok(())
}

/// The jobs whose cancel request went to `agent_id` and whose target it has not
/// answered, oldest job first.
pub async fn unanswered_cancels(db: &Db, agent_id: &str) -> anyhow::Result<Vec<String>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT job_id FROM job_targets WHERE agent_id = ?1 AND cancel_ms IS NOT NULL ORDER BY job_id",
    )?;
    let rows = stmt.query_map(params![agent_id], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Forgets the envelopes kept for a job's targets, so none is ever sent again.
pub async fn forget_envelopes(db: &Db, job_id: &str) -> anyhow::Result<()> {
    db.conn()
        .await
        .prepare_cached(
            "UPDATE job_targets SET envelope = NULL WHERE job_id = ?1 AND envelope IS NOT NULL",
        )?
        .execute(params![job_id])?;
    Ok(())
}

/// Records that the agent started a target; false if it was not waiting to start.
pub async fn mark_started(db: &Db, job_id: &str, agent_id: &str, now: u64) -> anyhow::Result<bool> {
    let n = db.conn().await.prepare_cached(
        "UPDATE job_targets SET state = 'in_progress', started_ms = ?3, updated_ms = ?3, envelope = NULL WHERE job_id = ?1 AND agent_id = ?2 AND state IN ('pending', 'delivered')",
    )?
    .execute(params![job_id, agent_id, to_i64(now)])?;
    Ok(n > 0)
}

/// Appends the `finished` event of a target, in the caller's transaction.
fn finished_in(
    tx: &Tx<'_>,
    events: &EventLog,
    job: (&str, u64, &str),
    target: (&str, &str, u32),
    state: TargetState,
    detail: Option<&str>,
    now: u64,
) -> anyhow::Result<i64> {
    let (plugin, version, world) = job;
    let (job_id, agent_id, attempt) = target;
    let body = TargetFinished {
        job_id: job_id.to_string(),
        agent_id: agent_id.to_string(),
        attempt,
        plugin: plugin.to_string(),
        version,
        world: world.to_string(),
        state,
        detail: detail.map(str::to_string),
    };
    events.append_in(tx, TARGET_FINISHED, &body, now)
}

/// Records a final state the server decided for a target that has no result, with its
/// `finished` event; returns the event's id, or None if the target had its answer.
pub async fn settle(
    db: &Db,
    events: &EventLog,
    job_id: &str,
    agent_id: &str,
    state: TargetState,
    detail: &str,
    now: u64,
) -> anyhow::Result<Option<i64>> {
    let tx = db.begin().await?;
    let changed = tx.prepare_cached(
        "UPDATE job_targets SET state = ?3, detail = ?4, finished_ms = ?5, updated_ms = ?5, envelope = NULL, cancel_ms = NULL WHERE job_id = ?1 AND agent_id = ?2 AND result IS NULL AND state IN ('pending', 'delivered', 'in_progress')",
    )?
    .execute(params![job_id, agent_id, state.as_str(), detail, to_i64(now)])?;
    if changed == 0 {
        return Ok(None);
    }
    let (plugin, version, world, attempt): (String, i64, String, u32) = tx
        .prepare_cached(
            "SELECT j.plugin, j.version, j.world, t.attempt FROM jobs j JOIN job_targets t ON t.job_id = j.id WHERE j.id = ?1 AND t.agent_id = ?2",
        )?
        .query_row(params![job_id, agent_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    let event = finished_in(
        &tx,
        events,
        (&plugin, to_u64(version), &world),
        (job_id, agent_id, attempt),
        state,
        Some(detail),
        now,
    )?;
    tx.commit()?;
    Ok(Some(event))
}

/// One result to record: the result, its audit line, and how to judge it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The agent's result.
    pub result: &'a JobResult,
    /// The detail of its `job.execute` audit entry.
    pub audit: &'a str,
}

/// Records results, each at most once per (agent, job, attempt), in one transaction:
/// what a burst of results costs the database is one commit. For each result stored,
/// the same transaction notes that its agent was heard from, appends its audit entry,
/// and appends its `finished` event; `judge` says what state the result puts its target
/// in, given the job's world. The outcomes are in the order of `results`.
pub async fn record_results(
    db: &Db,
    events: &EventLog,
    results: &[Incoming<'_>],
    judge: impl Fn(&JobResult, World) -> (TargetState, Option<String>),
    now: u64,
) -> anyhow::Result<Vec<Recorded>> {
    let tx = db.begin().await?;
    let mut outcomes = Vec::with_capacity(results.len());
    for &Incoming { result: r, audit } in results {
        crate::fleet::store::touch_in(&tx, &r.agent_id, now)?;
        let current: Option<(u32, bool, String, i64, String)> = tx
            .prepare_cached(
                "SELECT t.attempt, t.result IS NOT NULL, j.plugin, j.version, j.world FROM job_targets t JOIN jobs j ON j.id = t.job_id WHERE t.job_id = ?1 AND t.agent_id = ?2",
            )?
            .query_row(params![r.job_id, r.agent_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
            })
            .optional()?;
        let recorded = match current {
            None => Recorded::NoTarget,
            Some((attempt, ..)) if attempt != r.attempt => Recorded::NoTarget,
            Some((_, true, ..)) => Recorded::Duplicate,
            Some((attempt, false, plugin, version, world)) => {
                let w = world.parse::<World>().unwrap_or(World::Task);
                let (state, detail) = judge(r, w);
                tx.prepare_cached(
                    "UPDATE job_targets SET status = ?3, result = ?4, updated_ms = ?5, state = ?6, detail = ?7, finished_ms = ?5, envelope = NULL, cancel_ms = NULL WHERE job_id = ?1 AND agent_id = ?2 AND result IS NULL",
                )?
                .execute(params![
                    r.job_id,
                    r.agent_id,
                    r.status.as_str(),
                    serde_json::to_string(r)?,
                    to_i64(now),
                    state.as_str(),
                    detail
                ])?;
                Audit::record_in(
                    &tx,
                    &Entry {
                        actor: &format!("agent:{}", r.agent_id),
                        action: "job.execute",
                        target: &r.job_id,
                        outcome: r.status.as_str(),
                        detail: audit,
                    },
                    now,
                )?;
                let event = finished_in(
                    &tx,
                    events,
                    (&plugin, to_u64(version), &world),
                    (&r.job_id, &r.agent_id, attempt),
                    state,
                    detail.as_deref(),
                    now,
                )?;
                Recorded::Stored(state, detail, event)
            }
        };
        outcomes.push(recorded);
    }
    tx.commit()?;
    Ok(outcomes)
}

/// The attempt `agent_id`'s target of `job_id` is at, if there is such a target.
pub async fn attempt_of(db: &Db, job_id: &str, agent_id: &str) -> anyhow::Result<Option<u32>> {
    Ok(db
        .conn()
        .await
        .prepare_cached("SELECT attempt FROM job_targets WHERE job_id = ?1 AND agent_id = ?2")?
        .query_row(params![job_id, agent_id], |r| r.get(0))
        .optional()?)
}

/// A target's result for an attempt, if it has one.
pub async fn result_of(
    db: &Db,
    job_id: &str,
    agent_id: &str,
    attempt: u32,
) -> anyhow::Result<Option<JobResult>> {
    let text: Option<Option<String>> = db
        .conn()
        .await
        .prepare_cached(
            "SELECT result FROM job_targets WHERE job_id = ?1 AND agent_id = ?2 AND attempt = ?3",
        )?
        .query_row(params![job_id, agent_id, attempt], |r| r.get(0))
        .optional()?;
    Ok(match text.flatten() {
        Some(t) => Some(serde_json::from_str(&t)?),
        None => None,
    })
}

const ROLLOUT_COLUMNS: &str = "job_id, spec, created_ms, cancelled_ms, done_ms";

type RolloutColumns = (String, String, i64, Option<i64>, Option<i64>);

fn rollout_columns(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutColumns> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn rollout_info(c: RolloutColumns) -> Result<RolloutInfo, (String, String)> {
    let (job_id, spec, created, cancelled, done) = c;
    match serde_json::from_str(&spec) {
        Ok(spec) => Ok(RolloutInfo {
            job_id,
            spec,
            created_ms: to_u64(created),
            cancelled_ms: opt_u64(cancelled),
            done_ms: opt_u64(done),
        }),
        Err(e) => Err((job_id, format!("its stored settings are unreadable: {e}"))),
    }
}

/// Rollouts not yet done, oldest first; a row that cannot be read comes back as its job
/// id and the reason.
pub async fn active_rollouts(
    db: &Db,
) -> anyhow::Result<Vec<Result<RolloutInfo, (String, String)>>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare(&format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE done_ms IS NULL ORDER BY created_ms"
    ))?;
    let rows = stmt.query_map([], rollout_columns)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(rollout_info(row?));
    }
    Ok(out)
}

/// A job's rollout.
pub async fn rollout(db: &Db, job_id: &str) -> anyhow::Result<Option<RolloutInfo>> {
    let row = db
        .conn()
        .await
        .prepare_cached(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE job_id = ?1"
        ))?
        .query_row(params![job_id], rollout_columns)
        .optional()?;
    row.map(|c| rollout_info(c).map_err(|(_, why)| anyhow::anyhow!("job {job_id}: {why}")))
        .transpose()
}

/// Marks a rollout cancelled.
pub async fn cancel_rollout(db: &Db, job_id: &str, now: u64) -> anyhow::Result<()> {
    db.conn()
        .await
        .prepare_cached(
            "UPDATE rollouts SET cancelled_ms = ?2 WHERE job_id = ?1 AND cancelled_ms IS NULL",
        )?
        .execute(params![job_id, to_i64(now)])?;
    Ok(())
}

/// Marks a rollout done.
pub async fn finish_rollout(db: &Db, job_id: &str, now: u64) -> anyhow::Result<()> {
    db.conn()
        .await
        .prepare_cached("UPDATE rollouts SET done_ms = ?2 WHERE job_id = ?1 AND done_ms IS NULL")?
        .execute(params![job_id, to_i64(now)])?;
    Ok(())
}

/// Whether `agent_id` has a target that was sent to it and is not final yet, of a job
/// whose plugin is the blob `sha256`: the only blobs it has a reason to fetch.
pub async fn delivered_blob(db: &Db, agent_id: &str, sha256: &str) -> anyhow::Result<bool> {
    // The state terms match the `job_targets_open` index's.
    Ok(db.conn().await.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM job_targets t JOIN jobs j ON j.id = t.job_id \
         JOIN plugins p ON p.name = j.plugin AND p.version = j.version \
         WHERE t.agent_id = ?1 AND t.result IS NULL AND t.state IN ('pending', 'delivered', 'in_progress') \
         AND t.state != 'pending' AND p.sha256 = ?2)",
    )?
    .query_row(params![agent_id, sha256], |r| r.get(0))?)
}

/// Jobs in which this agent's target is not final yet.
pub async fn open_targets_of(db: &Db, agent_id: &str) -> anyhow::Result<Vec<String>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT job_id FROM job_targets WHERE agent_id = ?1 AND result IS NULL AND state IN ('pending', 'delivered', 'in_progress')",
    )?;
    let rows = stmt.query_map(params![agent_id], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// How many targets a job has, and how many are done (final, or with a result): a
/// cheap question for pollers, which need no outputs.
pub async fn progress_of(db: &Db, job_id: &str) -> anyhow::Result<(usize, usize)> {
    Ok(db.conn().await.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN result IS NOT NULL OR state NOT IN ('pending', 'delivered', 'in_progress') THEN 1 ELSE 0 END), 0) FROM job_targets WHERE job_id = ?1",
    )?
    .query_row(params![job_id], |r| {
        Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize))
    })?)
}

/// Each target's agent, state and detail, and whether it is done, without results.
pub async fn target_states(db: &Db, job_id: &str) -> anyhow::Result<Vec<TargetBrief>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT agent_id, state, detail, result IS NOT NULL FROM job_targets WHERE job_id = ?1 ORDER BY agent_id",
    )?;
    let rows = stmt.query_map(params![job_id], |r| {
        let state: String = r.get(1)?;
        let state = TargetState::parse(&state).unwrap_or(TargetState::Pending);
        let has_result: bool = r.get(3)?;
        Ok((
            r.get::<_, String>(0)?,
            state,
            r.get::<_, Option<String>>(2)?,
            has_result || state.is_final(),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Targets per state of a job, every state present.
pub async fn state_counts(db: &Db, job_id: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT state, COUNT(*) FROM job_targets WHERE job_id = ?1 GROUP BY state",
    )?;
    let mut counts: BTreeMap<String, usize> = TargetState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    let rows = stmt.query_map(params![job_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))
    })?;
    for row in rows {
        let (state, n) = row?;
        counts.insert(state, n);
    }
    Ok(counts)
}

/// Recent jobs, newest first; only those of plugins implementing `world`, if given.
pub async fn jobs(db: &Db, world: Option<&str>, limit: u32) -> anyhow::Result<Vec<Job>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR world = ?1 ORDER BY created_ms DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![world, limit], job_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A job.
pub async fn job(db: &Db, id: &str) -> anyhow::Result<Option<Job>> {
    Ok(db
        .conn()
        .await
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row(params![id], job_row)
        .optional()?)
}

/// A job's targets updated at or after `since_ms` (0: all), by agent id.
pub async fn targets(db: &Db, job_id: &str, since_ms: u64) -> anyhow::Result<Vec<Target>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT agent_id, attempt, status, result, updated_ms, state, detail, dispatched_ms, started_ms, finished_ms FROM job_targets WHERE job_id = ?1 AND updated_ms >= ?2 ORDER BY agent_id",
    )?;
    let rows = stmt.query_map(params![job_id, to_i64(since_ms)], |r| {
        let result: Option<String> = r.get(3)?;
        let state: String = r.get(5)?;
        Ok(Target {
            agent_id: r.get(0)?,
            attempt: r.get(1)?,
            status: r.get(2)?,
            state: TargetState::parse(&state).unwrap_or(TargetState::Pending),
            detail: r.get(6)?,
            result: result.and_then(|t| serde_json::from_str(&t).ok()),
            updated_ms: to_u64(r.get(4)?),
            dispatched_ms: opt_u64(r.get(7)?),
            started_ms: opt_u64(r.get(8)?),
            finished_ms: opt_u64(r.get(9)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests;
