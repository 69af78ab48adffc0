//! SQL of the fleet: `agents`, `agent_keys`, `broker_users`, `activations` and
//! `agent_events`.

use std::collections::BTreeMap;

use drover_protocol::agent::Hello;
use drover_protocol::keys::PublicKey;
use rusqlite::{OptionalExtension as _, params};

use super::lifecycle::Lifecycle;
use super::types::{Activation, Agent, AgentEvent};
use crate::events::EventLog;
use crate::store::{Db, Schema, Tx, opt_u64, to_i64, to_u64};

/// The fleet's tables.
pub const SCHEMA: Schema = Schema {
    name: "fleet",
    migrations: &[
        ("V1__agents", include_str!("migrations/V1__agents.sql")),
        (
            "V2__agent_events",
            include_str!("migrations/V2__agent_events.sql"),
        ),
        (
            "V3__server_tags_and_replay_marks",
            include_str!("migrations/V3__server_tags_and_replay_marks.sql"),
        ),
    ],
};

/// The most events kept per agent in `agent_events`: older ones are dropped, and the log
/// says so.
pub const EVENTS_KEPT_PER_AGENT: u32 = 1000;
/// How many of an agent's oldest events go at once when it has too many: cutting in
/// steps costs one notice per step, not one per event.
const EVENTS_CUT: u32 = 100;
/// The most events kept across agents (ids a broker made up included); checked every
/// [`EVENTS_TOTAL_EVERY`] events.
const EVENTS_KEPT_IN_ALL: u32 = 100_000;
const EVENTS_TOTAL_EVERY: i64 = 1024;

/// Notes that agent ?1 was heard from at ?2.
const TOUCH: &str = "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1";

/// A stored broker credential.
#[derive(Debug, Clone)]
pub struct BrokerUser {
    /// `agent`.
    pub role: String,
    /// Random salt.
    pub salt: Vec<u8>,
    /// SHA-256 of salt and password.
    pub hash: Vec<u8>,
}

/// An agent's enrolled public keys.
#[derive(Debug, Clone)]
pub struct AgentKeys {
    /// The agent.
    pub agent_id: String,
    /// Ed25519: results, heartbeats, progress.
    pub signing_key: PublicKey,
    /// X25519, hex: sealed secrets.
    pub sealing_key: String,
    /// The activation it enrolled with.
    pub activation_id: String,
}

/// An activation with its salt and code hash.
pub type StoredActivation = (Activation, Vec<u8>, Vec<u8>);

/// What a signed hello or heartbeat did: taken, or refused because the agent signed a
/// newer one before (a replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh<T> {
    /// Taken.
    Taken(T),
    /// Not newer than the last one taken, which was signed at `last_ms`.
    NotNewer {
        /// When the last one taken was signed, the agent's Unix ms.
        last_ms: u64,
    },
}

/// A broker credential minted for an agent, without its password.
#[derive(Debug, Clone)]
pub struct NewCredential {
    /// Random salt.
    pub salt: Vec<u8>,
    /// SHA-256 of salt and password.
    pub hash: Vec<u8>,
    /// The same password as a Mosquitto password-file hash.
    pub mosquitto_hash: String,
}

/// What enrolling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolled {
    /// Enrolled, with the id of the `enrolled` event, and whether the credential offered
    /// was stored (it is not when the agent already had one).
    Done {
        /// The `enrolled` event.
        event: i64,
        /// Whether the new credential was stored.
        credential: bool,
    },
    /// Refused: an open activation names an id the server already knows.
    Known,
    /// Refused: the activation has no uses left.
    UsedUp,
}

fn append(tx: &Tx<'_>, events: &EventLog, e: &Lifecycle, now: u64) -> anyhow::Result<i64> {
    events.append_in(tx, e.kind(), e, now)
}

// ---- agents ----

/// Records an agent's hello, if it was signed after the last one taken: it is online,
/// with what it says of itself (its labels, not its tags). Returns the `online` event's
/// id.
pub async fn record_hello(
    db: &Db,
    events: &EventLog,
    hello: &Hello,
    now: u64,
) -> anyhow::Result<Fresh<i64>> {
    let tx = db.begin().await?;
    let last: Option<Option<i64>> = tx
        .prepare_cached("SELECT hello_sent_ms FROM agents WHERE id = ?1")?
        .query_row(params![hello.agent_id], |r| r.get(0))
        .optional()?;
    if let Some(Some(last)) = last
        && to_u64(last) >= hello.sent_at_ms
    {
        return Ok(Fresh::NotNewer {
            last_ms: to_u64(last),
        });
    }
    tx.prepare_cached(
        "INSERT INTO agents (id, hostname, os, os_version, arch, agent_version, labels, online, first_seen_ms, last_seen_ms, status_changed_ms, hello_sent_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?8, ?8, ?9)
         ON CONFLICT(id) DO UPDATE SET hostname = ?2, os = ?3, os_version = ?4, arch = ?5,
            agent_version = ?6, labels = ?7, last_seen_ms = ?8, hello_sent_ms = ?9,
            status_changed_ms = CASE WHEN online = 0 THEN ?8 ELSE status_changed_ms END,
            online = 1",
    )?
    .execute(params![
        hello.agent_id,
        hello.hostname,
        hello.os,
        hello.os_version,
        hello.arch,
        hello.agent_version,
        serde_json::to_string(&hello.tags)?,
        to_i64(now),
        to_i64(hello.sent_at_ms)
    ])?;
    let id = append(
        &tx,
        events,
        &Lifecycle::Online {
            agent_id: hello.agent_id.clone(),
            since_ms: now,
            keyset_version: hello.keyset_version,
        },
        now,
    )?;
    tx.commit()?;
    Ok(Fresh::Taken(id))
}

/// Records a heartbeat signed at `at_ms`, if that is after the last one taken: the agent
/// was heard from.
pub async fn record_heartbeat(
    db: &Db,
    id: &str,
    at_ms: u64,
    now: u64,
) -> anyhow::Result<Fresh<()>> {
    let tx = db.begin().await?;
    let last: Option<Option<i64>> = tx
        .prepare_cached("SELECT heartbeat_at_ms FROM agents WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    if let Some(Some(last)) = last
        && to_u64(last) >= at_ms
    {
        return Ok(Fresh::NotNewer {
            last_ms: to_u64(last),
        });
    }
    tx.prepare_cached("UPDATE agents SET last_seen_ms = ?2, heartbeat_at_ms = ?3 WHERE id = ?1")?
        .execute(params![id, to_i64(now), to_i64(at_ms)])?;
    tx.commit()?;
    Ok(Fresh::Taken(()))
}

/// Records presence; unknown agents are created with what little is known. Going
/// offline is an `offline` event; returns its id.
pub async fn record_presence(
    db: &Db,
    events: &EventLog,
    id: &str,
    online: bool,
    now: u64,
) -> anyhow::Result<Option<i64>> {
    let tx = db.begin().await?;
    let was: Option<bool> = tx
        .prepare_cached("SELECT online FROM agents WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    tx.prepare_cached(
        "INSERT INTO agents (id, online, first_seen_ms, last_seen_ms, status_changed_ms)
         VALUES (?1, ?2, ?3, ?3, ?3)
         ON CONFLICT(id) DO UPDATE SET
            status_changed_ms = CASE WHEN online != ?2 THEN ?3 ELSE status_changed_ms END,
            online = ?2,
            last_seen_ms = CASE WHEN ?2 THEN ?3 ELSE last_seen_ms END",
    )?
    .execute(params![id, online, to_i64(now)])?;
    let event = if !online && was != Some(false) {
        let e = Lifecycle::Offline {
            agent_id: id.to_string(),
        };
        Some(append(&tx, events, &e, now)?)
    } else {
        None
    };
    tx.commit()?;
    Ok(event)
}

/// Notes that an agent was heard from.
pub async fn touch(db: &Db, id: &str, now: u64) -> anyhow::Result<()> {
    db.conn()
        .await
        .prepare_cached(TOUCH)?
        .execute(params![id, to_i64(now)])?;
    Ok(())
}

/// Notes that an agent was heard from, in the caller's transaction.
pub fn touch_in(tx: &Tx<'_>, id: &str, now: u64) -> anyhow::Result<()> {
    tx.prepare_cached(TOUCH)?
        .execute(params![id, to_i64(now)])?;
    Ok(())
}

const AGENT_COLUMNS: &str = "id, hostname, os, os_version, arch, agent_version, tags, online, first_seen_ms, last_seen_ms, status_changed_ms, deregistered_ms, labels";

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Agent> {
    Ok(Agent {
        id: r.get(0)?,
        hostname: r.get(1)?,
        os: r.get(2)?,
        os_version: r.get(3)?,
        arch: r.get(4)?,
        agent_version: r.get(5)?,
        tags: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
        online: r.get(7)?,
        first_seen_ms: to_u64(r.get(8)?),
        last_seen_ms: to_u64(r.get(9)?),
        status_changed_ms: to_u64(r.get(10)?),
        deregistered_ms: opt_u64(r.get(11)?),
        labels: serde_json::from_str(&r.get::<_, String>(12)?).unwrap_or_default(),
    })
}

/// All agents, by id.
pub async fn agents(db: &Db) -> anyhow::Result<Vec<Agent>> {
    let conn = db.conn().await;
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY id"))?;
    let rows = stmt.query_map([], agent_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One agent.
pub async fn agent(db: &Db, id: &str) -> anyhow::Result<Option<Agent>> {
    Ok(db
        .conn()
        .await
        .prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"))?
        .query_row(params![id], agent_row)
        .optional()?)
}

/// Sets and removes tags of agent `id`; returns its tags then, or None if the server
/// knows no agent by that id.
pub async fn retag(
    db: &Db,
    id: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> anyhow::Result<Option<BTreeMap<String, String>>> {
    let tx = db.begin().await?;
    let Some(text) = tx
        .prepare_cached("SELECT tags FROM agents WHERE id = ?1")?
        .query_row(params![id], |r| r.get::<_, String>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let mut tags: BTreeMap<String, String> = serde_json::from_str(&text).unwrap_or_default();
    for k in remove {
        tags.remove(k);
    }
    tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    tx.prepare_cached("UPDATE agents SET tags = ?2 WHERE id = ?1")?
        .execute(params![id, serde_json::to_string(&tags)?])?;
    tx.commit()?;
    Ok(Some(tags))
}

/// Deregisters an agent: deletes its broker credential and marks it deregistered (and
/// offline), with a `deregistered` event. None if the server knows no agent or
/// credential by that id; the event's id otherwise. Deregistering again keeps the
/// first time.
pub async fn deregister(
    db: &Db,
    events: &EventLog,
    id: &str,
    now: u64,
) -> anyhow::Result<Option<i64>> {
    let tx = db.begin().await?;
    let credentials = tx.execute(
        "DELETE FROM broker_users WHERE username = ?1 AND role = 'agent'",
        params![id],
    )?;
    let known: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM agents WHERE id = ?1)",
        params![id],
        |r| r.get(0),
    )?;
    if credentials == 0 && !known {
        return Ok(None);
    }
    // An agent that never connected has a credential but no row yet.
    tx.execute(
        "INSERT INTO agents (id, online, first_seen_ms, last_seen_ms, status_changed_ms, deregistered_ms)
         VALUES (?1, 0, ?2, 0, ?2, ?2)
         ON CONFLICT(id) DO UPDATE SET
            status_changed_ms = CASE WHEN online != 0 THEN ?2 ELSE status_changed_ms END,
            online = 0,
            deregistered_ms = COALESCE(deregistered_ms, ?2)",
        params![id, to_i64(now)],
    )?;
    let e = Lifecycle::Deregistered {
        agent_id: id.to_string(),
    };
    let event = append(&tx, events, &e, now)?;
    tx.commit()?;
    Ok(Some(event))
}

/// Whether agent `id` is deregistered (false for unknown agents).
pub async fn is_deregistered(db: &Db, id: &str) -> anyhow::Result<bool> {
    Ok(db
        .conn()
        .await
        .prepare_cached("SELECT deregistered_ms IS NOT NULL FROM agents WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?
        .unwrap_or(false))
}

/// The key agent `id` signs with, and whether it is deregistered; None when it has not
/// enrolled. One query, for checking every signed message an agent sends.
pub async fn signing_key_of(db: &Db, id: &str) -> anyhow::Result<Option<(PublicKey, bool)>> {
    let row: Option<(String, bool)> = db
        .conn()
        .await
        .prepare_cached(
            "SELECT k.signing_key, a.deregistered_ms IS NOT NULL FROM agent_keys k
             LEFT JOIN agents a ON a.id = k.agent_id WHERE k.agent_id = ?1",
        )?
        .query_row(params![id], |r| {
            Ok((r.get(0)?, r.get::<_, Option<bool>>(1)?.unwrap_or(false)))
        })
        .optional()?;
    row.map(|(key, gone)| Ok((PublicKey::from_hex(&key)?, gone)))
        .transpose()
}

// ---- broker credentials ----

/// Stores (replacing) a broker credential; `mosquitto_hash` is the same password as a
/// Mosquitto password-file hash. A deregistered agent given a new credential is
/// registered again.
pub async fn put_broker_user(
    db: &Db,
    username: &str,
    role: &str,
    salt: &[u8],
    hash: &[u8],
    mosquitto_hash: Option<&str>,
    now: u64,
) -> anyhow::Result<()> {
    let tx = db.begin().await?;
    tx.execute(
        "INSERT INTO broker_users (username, role, salt, hash, created_ms, mosquitto_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(username) DO UPDATE SET role = ?2, salt = ?3, hash = ?4, created_ms = ?5, mosquitto_hash = ?6",
        params![username, role, salt, hash, to_i64(now), mosquitto_hash],
    )?;
    if role == "agent" {
        tx.execute(
            "UPDATE agents SET deregistered_ms = NULL WHERE id = ?1",
            params![username],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// A broker credential.
pub async fn broker_user(db: &Db, username: &str) -> anyhow::Result<Option<BrokerUser>> {
    Ok(db
        .conn()
        .await
        .prepare_cached("SELECT role, salt, hash FROM broker_users WHERE username = ?1")?
        .query_row(params![username], |r| {
            Ok(BrokerUser {
                role: r.get(0)?,
                salt: r.get(1)?,
                hash: r.get(2)?,
            })
        })
        .optional()?)
}

/// The agents' broker logins (not deregistered ones: their credentials are gone), by
/// username, with their Mosquitto password-file hashes (None for credentials minted
/// before those were kept).
pub async fn agent_broker_logins(db: &Db) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT username, mosquitto_hash FROM broker_users
         WHERE role = 'agent'
           AND username NOT IN (SELECT id FROM agents WHERE deregistered_ms IS NOT NULL)
         ORDER BY username",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- agent events ----

/// Records something an agent reported outside any job, or a refusal of what it sent.
/// Each agent keeps its newest [`EVENTS_KEPT_PER_AGENT`] events: when it has more, the
/// oldest are deleted and a `dropped` event says how many. Returns how many events were
/// deleted.
pub async fn add_agent_event(
    db: &Db,
    agent_id: &str,
    kind: &str,
    message: &str,
    now: u64,
) -> anyhow::Result<u64> {
    const INSERT: &str =
        "INSERT INTO agent_events (at_ms, agent_id, kind, message) VALUES (?1, ?2, ?3, ?4)";
    // The id of the agent's event ?2 places before its newest (0: the newest).
    const NTH_NEWEST: &str =
        "SELECT id FROM agent_events WHERE agent_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2";
    let tx = db.begin().await?;
    tx.prepare_cached(INSERT)?
        .execute(params![to_i64(now), agent_id, kind, message])?;
    let id = tx.last_insert_rowid();
    let mut deleted = 0u64;
    let over = tx
        .prepare_cached(NTH_NEWEST)?
        .query_row(params![agent_id, EVENTS_KEPT_PER_AGENT], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?;
    if over.is_some() {
        // Down to the bound less a step: the newest, and the notice.
        let keep = EVENTS_KEPT_PER_AGENT - EVENTS_CUT - 1;
        let cut: i64 = tx
            .prepare_cached(NTH_NEWEST)?
            .query_row(params![agent_id, keep - 1], |r| r.get(0))?;
        let n = tx
            .prepare_cached("DELETE FROM agent_events WHERE agent_id = ?1 AND id < ?2")?
            .execute(params![agent_id, cut])? as u64;
        deleted += n;
        let notice = format!(
            "{n} older events of agent {agent_id} were dropped: the log keeps the newest {EVENTS_KEPT_PER_AGENT} of each agent"
        );
        tx.prepare_cached(INSERT)?
            .execute(params![to_i64(now), agent_id, "dropped", notice])?;
    }
    if id % EVENTS_TOTAL_EVERY == 0 {
        deleted += tx
            .prepare_cached(
                "DELETE FROM agent_events WHERE id < (SELECT id FROM agent_events ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            )?
            .execute(params![EVENTS_KEPT_IN_ALL])? as u64;
    }
    tx.commit()?;
    Ok(deleted)
}

/// Agent events, newest last; optionally for one agent.
pub async fn agent_events(
    db: &Db,
    agent_id: Option<&str>,
    limit: u32,
) -> anyhow::Result<Vec<AgentEvent>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, agent_id, kind, message FROM agent_events
         WHERE ?1 IS NULL OR agent_id = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![agent_id, limit], |r| {
        Ok(AgentEvent {
            id: r.get(0)?,
            at_ms: to_u64(r.get(1)?),
            agent_id: r.get(2)?,
            kind: r.get(3)?,
            message: r.get(4)?,
        })
    })?;
    let mut v: Vec<AgentEvent> = rows.collect::<Result<_, _>>()?;
    v.reverse();
    Ok(v)
}

// ---- activations and agent keys ----

/// Stores a new activation.
pub async fn create_activation(
    db: &Db,
    a: &Activation,
    salt: &[u8],
    code_hash: &[u8],
) -> anyhow::Result<()> {
    db.conn().await.execute(
        "INSERT INTO activations (id, salt, code_hash, agent_id, tags, max_uses, uses, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8)",
        params![
            a.id,
            salt,
            code_hash,
            a.agent_id,
            serde_json::to_string(&a.tags)?,
            a.max_uses,
            to_i64(a.created_ms),
            to_i64(a.expires_ms)
        ],
    )?;
    Ok(())
}

const ACTIVATION_COLUMNS: &str =
    "id, salt, code_hash, agent_id, tags, max_uses, uses, created_ms, expires_ms, revoked_ms";

fn activation_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredActivation> {
    Ok((
        Activation {
            id: r.get(0)?,
            agent_id: r.get(3)?,
            tags: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
            max_uses: r.get(5)?,
            uses: r.get(6)?,
            created_ms: to_u64(r.get(7)?),
            expires_ms: to_u64(r.get(8)?),
            revoked_ms: opt_u64(r.get(9)?),
        },
        r.get(1)?,
        r.get(2)?,
    ))
}

/// An activation with its salt and code hash.
pub async fn activation(db: &Db, id: &str) -> anyhow::Result<Option<StoredActivation>> {
    Ok(db
        .conn()
        .await
        .query_row(
            &format!("SELECT {ACTIVATION_COLUMNS} FROM activations WHERE id = ?1"),
            params![id],
            activation_from_row,
        )
        .optional()?)
}

/// All activations, newest first.
pub async fn activations(db: &Db) -> anyhow::Result<Vec<Activation>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ACTIVATION_COLUMNS} FROM activations ORDER BY created_ms DESC"
    ))?;
    let rows = stmt.query_map([], activation_from_row)?;
    Ok(rows
        .map(|r| r.map(|(a, _, _)| a))
        .collect::<Result<_, _>>()?)
}

/// Revokes an activation; false if there is none (or it was revoked already).
pub async fn revoke_activation(db: &Db, id: &str, now: u64) -> anyhow::Result<bool> {
    Ok(db.conn().await.execute(
        "UPDATE activations SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
        params![id, to_i64(now)],
    )? > 0)
}

/// Records an agent's enrolled keys (replacing earlier ones), with an `enrolled` event;
/// returns the event's id.
pub async fn put_agent_keys(
    db: &Db,
    events: &EventLog,
    k: &AgentKeys,
    tags: &BTreeMap<String, String>,
    now: u64,
) -> anyhow::Result<i64> {
    let tx = db.begin().await?;
    let event = put_keys_in(&tx, events, k, tags, now)?;
    tx.commit()?;
    Ok(event)
}

fn put_keys_in(
    tx: &Tx<'_>,
    events: &EventLog,
    k: &AgentKeys,
    tags: &BTreeMap<String, String>,
    now: u64,
) -> anyhow::Result<i64> {
    tx.execute(
        "INSERT INTO agent_keys (agent_id, signing_key, sealing_key, activation_id, enrolled_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(agent_id) DO UPDATE SET signing_key = ?2, sealing_key = ?3, activation_id = ?4, enrolled_ms = ?5",
        params![k.agent_id, k.signing_key.to_hex(), k.sealing_key, k.activation_id, to_i64(now)],
    )?;
    let e = Lifecycle::Enrolled {
        agent_id: k.agent_id.clone(),
        activation_id: k.activation_id.clone(),
        tags: tags.clone(),
    };
    append(tx, events, &e, now)
}

/// Enrolls an agent in one transaction: uses the activation once, stores `credential`
/// unless the agent has one, stores its keys (replacing earlier ones) and its tags from
/// the activation, and appends the `enrolled` event. With an `open` activation (bound to
/// no id) an id the server knows in any way (an agent, a broker credential, keys) is
/// refused, and nothing is written.
pub async fn enroll(
    db: &Db,
    events: &EventLog,
    k: &AgentKeys,
    tags: &BTreeMap<String, String>,
    open: bool,
    credential: Option<&NewCredential>,
    now: u64,
) -> anyhow::Result<Enrolled> {
    let tx = db.begin().await?;
    if open {
        let known: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE id = ?1)
                 OR EXISTS (SELECT 1 FROM broker_users WHERE username = ?1)
                 OR EXISTS (SELECT 1 FROM agent_keys WHERE agent_id = ?1)",
            params![k.agent_id],
            |r| r.get(0),
        )?;
        if known {
            return Ok(Enrolled::Known);
        }
    }
    let used = tx.execute(
        "UPDATE activations SET uses = uses + 1 WHERE id = ?1 AND uses < max_uses",
        params![k.activation_id],
    )?;
    if used == 0 {
        return Ok(Enrolled::UsedUp);
    }
    // Never a replacement: a credential the agent has stays its own.
    let credential = match credential {
        Some(c) => {
            tx.execute(
                "INSERT INTO broker_users (username, role, salt, hash, created_ms, mosquitto_hash) VALUES (?1, 'agent', ?2, ?3, ?4, ?5)
                 ON CONFLICT(username) DO NOTHING",
                params![k.agent_id, c.salt, c.hash, to_i64(now), c.mosquitto_hash],
            )? > 0
        }
        None => false,
    };
    tx.execute(
        "INSERT INTO agents (id, tags, online, first_seen_ms, last_seen_ms, status_changed_ms)
         VALUES (?1, ?2, 0, ?3, 0, ?3)
         ON CONFLICT(id) DO UPDATE SET tags = ?2",
        params![k.agent_id, serde_json::to_string(tags)?, to_i64(now)],
    )?;
    let event = put_keys_in(&tx, events, k, tags, now)?;
    tx.commit()?;
    Ok(Enrolled::Done { event, credential })
}

/// An agent's enrolled keys.
pub async fn agent_keys(db: &Db, agent_id: &str) -> anyhow::Result<Option<AgentKeys>> {
    let row: Option<(String, String, String, String)> = db
        .conn()
        .await
        .prepare_cached(
            "SELECT agent_id, signing_key, sealing_key, activation_id FROM agent_keys WHERE agent_id = ?1",
        )?
        .query_row(params![agent_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    row.map(|(agent_id, sk, sealing_key, activation_id)| {
        Ok(AgentKeys {
            agent_id,
            signing_key: PublicKey::from_hex(&sk)?,
            sealing_key,
            activation_id,
        })
    })
    .transpose()
}

/// The sealing keys of `agents`, hex, by agent; agents without one are left out.
pub async fn sealing_keys(
    db: &Db,
    agents: &[String],
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached("SELECT sealing_key FROM agent_keys WHERE agent_id = ?1")?;
    let mut out = std::collections::HashMap::new();
    for a in agents {
        if let Some(k) = stmt
            .query_row(params![a], |r| r.get::<_, String>(0))
            .optional()?
        {
            out.insert(a.clone(), k);
        }
    }
    Ok(out)
}
