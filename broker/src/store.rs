//! The server's SQLite store: agents, broker credentials, plugins, jobs, results, events.
//!
//! One connection behind a mutex. Every statement is short, so callers on async tasks
//! hold it only for microseconds; a pool would add nothing on one SQLite file.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use drover_protocol::agent::Hello;
use drover_protocol::job::JobResult;
use drover_protocol::manifest::Manifest;
use drover_protocol::signed::Signed;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use crate::rollout::TargetState;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL DEFAULT '',
    os TEXT NOT NULL DEFAULT '',
    os_version TEXT NOT NULL DEFAULT '',
    arch TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    online INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    status_changed_ms INTEGER NOT NULL,
    deregistered_ms INTEGER
);
CREATE TABLE IF NOT EXISTS broker_users (
    username TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    mosquitto_hash TEXT
);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS plugins (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    world TEXT NOT NULL,
    manifest TEXT NOT NULL,
    published_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    version INTEGER NOT NULL,
    targets TEXT NOT NULL,
    input TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS job_targets (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    agent_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, agent_id)
);
CREATE TABLE IF NOT EXISTS rollouts (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    spec TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    cancelled_ms INTEGER,
    done_ms INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS activations (
    id TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    agent_id TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS agent_keys (
    agent_id TEXT PRIMARY KEY,
    signing_key TEXT NOT NULL,
    sealing_key TEXT NOT NULL,
    activation_id TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#;

/// An agent as the server knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentRow {
    /// Id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// OS family.
    pub os: String,
    /// Distribution and version.
    pub os_version: String,
    /// Architecture.
    pub arch: String,
    /// Agent version.
    pub agent_version: String,
    /// Tags.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Connected now.
    pub online: bool,
    /// First seen, Unix ms.
    pub first_seen_ms: u64,
    /// Last message, Unix ms.
    pub last_seen_ms: u64,
    /// When `online` last changed, Unix ms.
    pub status_changed_ms: u64,
    /// When it was deregistered (its broker credential deleted), Unix ms.
    #[serde(default)]
    pub deregistered_ms: Option<u64>,
}

/// A published plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginRow {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Digest.
    pub sha256: String,
    /// Length.
    pub length: u64,
    /// World.
    pub world: String,
    /// When published, Unix ms.
    pub published_ms: u64,
    /// The signed manifest.
    pub manifest: Signed<Manifest>,
}

/// A job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRow {
    /// Id.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version.
    pub version: u64,
    /// The target selector as given.
    pub targets: String,
    /// Input.
    pub input: serde_json::Value,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
}

/// One target of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRow {
    /// The agent.
    pub agent_id: String,
    /// Attempt.
    pub attempt: u32,
    /// The result's status: `pending`, `sent`, `succeeded`, `failed`, `rejected`.
    pub status: String,
    /// Where the target is: see [`TargetState`].
    pub state: TargetState,
    /// Why the server settled it (undeliverable, timed out, cancelled), or how it failed.
    #[serde(default)]
    pub detail: Option<String>,
    /// The result, once in.
    pub result: Option<JobResult>,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// When its envelope was sent, Unix ms.
    #[serde(default)]
    pub dispatched_ms: Option<u64>,
    /// When the agent said it started, Unix ms (the server's clock).
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// When it reached a final state, Unix ms (the server's clock).
    #[serde(default)]
    pub finished_ms: Option<u64>,
}

/// A target without its result: agent, state, detail, and whether it is done.
pub type TargetBrief = (String, TargetState, Option<String>, bool);

/// A rate-controlled job, as stored so that a restarted server carries on with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRow {
    /// The job.
    pub job_id: String,
    /// What the control plane needs to send envelopes later.
    pub spec: crate::control::RolloutSpec,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Cancelled, Unix ms.
    pub cancelled_ms: Option<u64>,
    /// Every target final, Unix ms.
    pub done_ms: Option<u64>,
}

impl TargetRow {
    /// Whether a result is in, or the server settled the target for good.
    pub fn is_done(&self) -> bool {
        self.result.is_some() || self.state.is_final()
    }
}

/// Something an agent reported that belongs to no job target, or a refusal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRow {
    /// Sequence.
    pub id: i64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// The agent.
    pub agent_id: String,
    /// Category.
    pub kind: String,
    /// What happened.
    pub message: String,
}

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

/// An activation: a code agents enroll with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivationRow {
    /// Id, shown to operators.
    pub id: String,
    /// The agent id it is bound to, if any.
    pub agent_id: Option<String>,
    /// Tags enrolled agents get.
    pub tags: std::collections::BTreeMap<String, String>,
    /// How many agents may enroll with it.
    pub max_uses: u32,
    /// How many have.
    pub uses: u32,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
    /// Revoked, Unix ms.
    pub revoked_ms: Option<u64>,
}

/// An activation with its salt and code hash.
pub type StoredActivation = (ActivationRow, Vec<u8>, Vec<u8>);

/// An agent's enrolled public keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentKeys {
    /// The agent.
    pub agent_id: String,
    /// Ed25519: results and heartbeats.
    pub signing_key: drover_protocol::keys::PublicKey,
    /// X25519, hex: sealed secrets.
    pub sealing_key: String,
    /// The activation it enrolled with.
    pub activation_id: String,
}

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRow {
    /// Sequence.
    pub id: i64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Who: `operator`, `agent:ID`, `enroll:ACTIVATION`.
    pub actor: String,
    /// What, such as `plugin.publish`, `job.create`, `job.result`.
    pub action: String,
    /// On what.
    pub target: String,
    /// `ok`, `refused`, `failed`, ...
    pub outcome: String,
    /// Details.
    pub detail: String,
}

/// Audit filters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditFilter {
    /// Exact actor.
    pub actor: Option<String>,
    /// Action prefix.
    pub action: Option<String>,
    /// Exact target.
    pub target: Option<String>,
    /// Exact outcome.
    pub outcome: Option<String>,
    /// Not before, Unix ms.
    #[serde(default)]
    pub since_ms: u64,
    /// At most this many.
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_limit() -> u32 {
    100
}

/// What recording a result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Stored as the target's result.
    Stored,
    /// The target already had a result for this attempt.
    Duplicate,
    /// No such job target.
    NoTarget,
}

/// How many prepared statements a connection keeps.
const STATEMENT_CACHE: usize = 64;

/// Notes that agent ?1 was heard from at ?2.
const TOUCH_AGENT: &str = "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1";

/// Appends (at_ms, actor, action, target, outcome, detail) to the audit log.
const INSERT_AUDIT: &str = "INSERT INTO audit (at_ms, actor, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The store handle; clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Columns added after the first release, added to older databases in place.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("job_targets", "state", "TEXT NOT NULL DEFAULT 'pending'"),
    ("job_targets", "detail", "TEXT"),
    ("job_targets", "dispatched_ms", "INTEGER"),
    ("job_targets", "started_ms", "INTEGER"),
    ("job_targets", "finished_ms", "INTEGER"),
    // The signed envelope as sent, kept until the agent answers: sent again when the
    // agent next says hello, so no broker has to keep it across a restart.
    ("job_targets", "envelope", "BLOB"),
    // When a cancel request was sent for a target still open: sent again when the agent
    // next says hello, until the target has its answer.
    // Every statement that answers a target (started, a result, settled) clears what it
    // no longer needs of these two, so a value present means "still owed".
    ("job_targets", "cancel_ms", "INTEGER"),
];

/// Indexes on added columns, made once the columns exist. Partial: they hold only the
/// few targets sent (or asked to cancel) and not yet answered, so keeping them costs
/// little.
const ADDED_INDEXES: &str = "CREATE INDEX IF NOT EXISTS job_targets_unanswered ON job_targets(agent_id) WHERE envelope IS NOT NULL; \
     CREATE INDEX IF NOT EXISTS job_targets_cancelling ON job_targets(agent_id) WHERE cancel_ms IS NOT NULL;";

fn migrate(conn: &Connection) -> anyhow::Result<()> {
    for (table, column, decl) in ADDED_COLUMNS {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let present = stmt
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .any(|c| c == column);
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            if *column == "state" {
                // Targets from before states existed get the state their status implies.
                conn.execute_batch(
                    "UPDATE job_targets SET state = CASE status \
                     WHEN 'succeeded' THEN 'success' \
                     WHEN 'failed' THEN 'failed' \
                     WHEN 'rejected' THEN 'failed' \
                     WHEN 'sent' THEN 'delivered' \
                     ELSE 'pending' END",
                )?;
            }
        }
    }
    conn.execute_batch(ADDED_INDEXES)?;
    Ok(())
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        plugin: r.get(1)?,
        version: r.get::<_, i64>(2)? as u64,
        targets: r.get(3)?,
        input: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or(serde_json::Value::Null),
        created_ms: r.get::<_, i64>(5)? as u64,
        expires_ms: r.get::<_, i64>(6)? as u64,
    })
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|v| v.max(0) as u64)
}

fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
        )?;
        conn.execute_batch(SCHEMA).context("creating schema")?;
        migrate(&conn).context("upgrading the schema")?;
        // Every statement on the hot paths is prepared once and kept.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one statement, prepared once and cached.
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.conn().prepare_cached(sql)?.execute(params)
    }

    // ---- agents ----

    /// Records an agent's announcement; it is online.
    pub fn upsert_hello(&self, hello: &Hello, now: u64) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO agents (id, hostname, os, os_version, arch, agent_version, tags, online, first_seen_ms, last_seen_ms, status_changed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?8, ?8)
             ON CONFLICT(id) DO UPDATE SET hostname = ?2, os = ?3, os_version = ?4, arch = ?5,
                agent_version = ?6, tags = ?7, last_seen_ms = ?8,
                status_changed_ms = CASE WHEN online = 0 THEN ?8 ELSE status_changed_ms END,
                online = 1",
            params![
                hello.agent_id,
                hello.hostname,
                hello.os,
                hello.os_version,
                hello.arch,
                hello.agent_version,
                serde_json::to_string(&hello.tags)?,
                to_i64(now)
            ],
        )?;
        Ok(())
    }

    /// Records presence. Unknown agents are created with what little is known.
    pub fn set_online(&self, id: &str, online: bool, now: u64) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO agents (id, online, first_seen_ms, last_seen_ms, status_changed_ms)
             VALUES (?1, ?2, ?3, ?3, ?3)
             ON CONFLICT(id) DO UPDATE SET
                status_changed_ms = CASE WHEN online != ?2 THEN ?3 ELSE status_changed_ms END,
                online = ?2,
                last_seen_ms = CASE WHEN ?2 THEN ?3 ELSE last_seen_ms END",
            params![id, online, to_i64(now)],
        )?;
        Ok(())
    }

    /// Notes that an agent was heard from.
    pub fn touch(&self, id: &str, now: u64) -> anyhow::Result<()> {
        self.exec(TOUCH_AGENT, params![id, to_i64(now)])?;
        Ok(())
    }

    /// All agents, by id.
    pub fn agents(&self) -> anyhow::Result<Vec<AgentRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, hostname, os, os_version, arch, agent_version, tags, online, first_seen_ms, last_seen_ms, status_changed_ms, deregistered_ms
             FROM agents ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(AgentRow {
                id: r.get(0)?,
                hostname: r.get(1)?,
                os: r.get(2)?,
                os_version: r.get(3)?,
                arch: r.get(4)?,
                agent_version: r.get(5)?,
                tags: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                online: r.get(7)?,
                first_seen_ms: r.get::<_, i64>(8)? as u64,
                last_seen_ms: r.get::<_, i64>(9)? as u64,
                status_changed_ms: r.get::<_, i64>(10)? as u64,
                deregistered_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- broker credentials ----

    /// Stores (replacing) a broker credential; `mosquitto_hash` is the same password as a
    /// Mosquitto password-file hash. A deregistered agent given a new credential is
    /// registered again.
    pub fn put_broker_user(
        &self,
        username: &str,
        role: &str,
        salt: &[u8],
        hash: &[u8],
        mosquitto_hash: Option<&str>,
        now: u64,
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
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

    /// The agents' broker logins (not deregistered ones: their credentials are gone), by
    /// username, with their Mosquitto password-file hashes (None for credentials minted
    /// before those were kept).
    pub fn agent_broker_logins(&self) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT username, mosquitto_hash FROM broker_users
             WHERE role = 'agent'
               AND username NOT IN (SELECT id FROM agents WHERE deregistered_ms IS NOT NULL)
             ORDER BY username",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deregisters an agent: deletes its broker credential and marks it deregistered
    /// (and offline). False if the server knows no agent or credential by that id.
    /// Deregistering again keeps the first time.
    pub fn deregister_agent(&self, id: &str, now: u64) -> anyhow::Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
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
            return Ok(false);
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
        tx.commit()?;
        Ok(true)
    }

    /// Whether agent `id` is deregistered (false for unknown agents).
    pub fn is_deregistered(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn()
            .prepare_cached("SELECT deregistered_ms IS NOT NULL FROM agents WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?
            .unwrap_or(false))
    }

    /// The key agent `id` signs with, and whether it is deregistered; None when it has not
    /// enrolled. One query, for checking every signed message an agent sends.
    pub fn signing_key_of(
        &self,
        id: &str,
    ) -> anyhow::Result<Option<(drover_protocol::keys::PublicKey, bool)>> {
        let row: Option<(String, bool)> = self
            .conn()
            .prepare_cached(
                "SELECT k.signing_key, a.deregistered_ms IS NOT NULL FROM agent_keys k
                 LEFT JOIN agents a ON a.id = k.agent_id WHERE k.agent_id = ?1",
            )?
            .query_row(params![id], |r| {
                Ok((r.get(0)?, r.get::<_, Option<bool>>(1)?.unwrap_or(false)))
            })
            .optional()?;
        row.map(|(key, gone)| Ok((drover_protocol::keys::PublicKey::from_hex(&key)?, gone)))
            .transpose()
    }

    /// A broker credential.
    pub fn broker_user(&self, username: &str) -> anyhow::Result<Option<BrokerUser>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT role, salt, hash FROM broker_users WHERE username = ?1",
                params![username],
                |r| {
                    Ok(BrokerUser {
                        role: r.get(0)?,
                        salt: r.get(1)?,
                        hash: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    // ---- plugins ----

    /// The newest version of a plugin.
    pub fn latest_version(&self, name: &str) -> anyhow::Result<Option<u64>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT MAX(version) FROM plugins WHERE name = ?1",
                params![name],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map(|v| v as u64))
    }

    /// Stores a plugin and its blob.
    pub fn put_plugin(
        &self,
        m: &Manifest,
        signed: &Signed<Manifest>,
        blob: &[u8],
        now: u64,
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO blobs (sha256, bytes) VALUES (?1, ?2)",
            params![m.sha256, blob],
        )?;
        tx.execute(
            "INSERT INTO plugins (name, version, sha256, length, world, manifest, published_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                m.name,
                to_i64(m.version),
                m.sha256,
                to_i64(m.length),
                m.world.as_str(),
                serde_json::to_string(signed)?,
                to_i64(now)
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn plugin_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(PluginRow, String)> {
        let manifest_text: String = r.get(5)?;
        let manifest = serde_json::from_str(&manifest_text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
        })?;
        Ok((
            PluginRow {
                name: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                sha256: r.get(2)?,
                length: r.get::<_, i64>(3)? as u64,
                world: r.get(4)?,
                published_ms: r.get::<_, i64>(6)? as u64,
                manifest,
            },
            manifest_text,
        ))
    }

    /// A plugin by name and version (the newest when `version` is `None`).
    pub fn plugin(&self, name: &str, version: Option<u64>) -> anyhow::Result<Option<PluginRow>> {
        let conn = self.conn();
        let q = "SELECT name, version, sha256, length, world, manifest, published_ms FROM plugins WHERE name = ?1";
        let row = match version {
            Some(v) => conn
                .query_row(
                    &format!("{q} AND version = ?2"),
                    params![name, to_i64(v)],
                    Self::plugin_from_row,
                )
                .optional()?,
            None => conn
                .query_row(
                    &format!("{q} ORDER BY version DESC LIMIT 1"),
                    params![name],
                    Self::plugin_from_row,
                )
                .optional()?,
        };
        Ok(row.map(|(p, _)| p))
    }

    /// All plugins.
    pub fn plugins(&self) -> anyhow::Result<Vec<PluginRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, version, sha256, length, world, manifest, published_ms FROM plugins ORDER BY name, version",
        )?;
        let rows = stmt.query_map([], Self::plugin_from_row)?;
        Ok(rows.map(|r| r.map(|(p, _)| p)).collect::<Result<_, _>>()?)
    }

    /// A blob by digest.
    pub fn blob(&self, sha256: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT bytes FROM blobs WHERE sha256 = ?1",
                params![sha256],
                |r| r.get(0),
            )
            .optional()?)
    }

    // ---- jobs ----

    /// Stores a job and its targets (all `pending`, attempt 1), and its rate control if
    /// it has any, in one transaction.
    pub fn create_job(
        &self,
        job: &JobRow,
        agents: &[String],
        rollout: Option<&RolloutRow>,
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO jobs (id, plugin, version, targets, input, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job.id,
                job.plugin,
                to_i64(job.version),
                job.targets,
                job.input.to_string(),
                to_i64(job.created_ms),
                to_i64(job.expires_ms)
            ],
        )?;
        for a in agents {
            tx.execute(
                "INSERT INTO job_targets (job_id, agent_id, attempt, status, updated_ms) VALUES (?1, ?2, 1, 'pending', ?3)",
                params![job.id, a, to_i64(job.created_ms)],
            )?;
        }
        if let Some(r) = rollout {
            tx.execute(
                "INSERT INTO rollouts (job_id, spec, created_ms) VALUES (?1, ?2, ?3)",
                params![
                    r.job_id,
                    serde_json::to_string(&r.spec)?,
                    to_i64(r.created_ms)
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks targets of one job as sent, in one transaction, keeping each target's
    /// signed envelope (agent, body) until the agent answers.
    pub fn mark_sent(&self, job_id: &str, sent: &[(&str, &[u8])], now: u64) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
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
    /// answered (an envelope is kept only until then), of jobs not yet expired at `now`,
    /// oldest job first.
    pub fn unanswered_envelopes(
        &self,
        agent_id: &str,
        sent_before: u64,
        now: u64,
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let conn = self.conn();
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
    pub fn mark_cancel_sent(&self, job_id: &str, agent_id: &str, now: u64) -> anyhow::Result<()> {
        self.exec(
            "UPDATE job_targets SET cancel_ms = ?3 WHERE job_id = ?1 AND agent_id = ?2 AND result IS NULL AND state IN ('pending', 'delivered', 'in_progress')",
            params![job_id, agent_id, to_i64(now)],
        )?;
        Ok(())
    }

    /// The jobs whose cancel request went to `agent_id` and whose target it has not
    /// answered (the request is kept only until then), oldest job first.
    pub fn unanswered_cancels(&self, agent_id: &str) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT job_id FROM job_targets WHERE agent_id = ?1 AND cancel_ms IS NOT NULL ORDER BY job_id",
        )?;
        let rows = stmt.query_map(params![agent_id], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the envelopes kept for a job's targets, so none is ever sent again (the
    /// job was cancelled).
    pub fn forget_envelopes(&self, job_id: &str) -> anyhow::Result<()> {
        self.exec(
            "UPDATE job_targets SET envelope = NULL WHERE job_id = ?1 AND envelope IS NOT NULL",
            params![job_id],
        )?;
        Ok(())
    }

    /// Records that the agent started a target.
    pub fn mark_started(&self, job_id: &str, agent_id: &str, now: u64) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE job_targets SET state = 'in_progress', started_ms = ?3, updated_ms = ?3, envelope = NULL WHERE job_id = ?1 AND agent_id = ?2 AND state IN ('pending', 'delivered')",
            params![job_id, agent_id, to_i64(now)],
        )?;
        Ok(n > 0)
    }

    /// Records a final state the server decided for a target that has no result.
    pub fn settle(
        &self,
        job_id: &str,
        agent_id: &str,
        state: TargetState,
        detail: &str,
        now: u64,
    ) -> anyhow::Result<()> {
        self.exec(
            "UPDATE job_targets SET state = ?3, detail = ?4, finished_ms = ?5, updated_ms = ?5, envelope = NULL, cancel_ms = NULL WHERE job_id = ?1 AND agent_id = ?2 AND result IS NULL",
            params![job_id, agent_id, state.as_str(), detail, to_i64(now)],
        )?;
        Ok(())
    }

    /// Rate-controlled jobs not yet done; a row that cannot be read comes back as its
    /// job id and the reason.
    pub fn active_rollouts(&self) -> anyhow::Result<Vec<Result<RolloutRow, (String, String)>>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT job_id, spec, created_ms, cancelled_ms, done_ms FROM rollouts WHERE done_ms IS NULL ORDER BY created_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, spec, created, cancelled, done) = row?;
            out.push(match serde_json::from_str(&spec) {
                Ok(spec) => Ok(RolloutRow {
                    job_id,
                    spec,
                    created_ms: created as u64,
                    cancelled_ms: opt_u64(cancelled),
                    done_ms: opt_u64(done),
                }),
                Err(e) => Err((job_id, format!("its stored settings are unreadable: {e}"))),
            });
        }
        Ok(out)
    }

    /// Whether a job is rate-controlled, and if so its row.
    pub fn rollout(&self, job_id: &str) -> anyhow::Result<Option<RolloutRow>> {
        let row = self
            .conn()
            .query_row(
                "SELECT spec, created_ms, cancelled_ms, done_ms FROM rollouts WHERE job_id = ?1",
                params![job_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((spec, created, cancelled, done)) = row else {
            return Ok(None);
        };
        Ok(Some(RolloutRow {
            job_id: job_id.to_string(),
            spec: serde_json::from_str(&spec)?,
            created_ms: created as u64,
            cancelled_ms: opt_u64(cancelled),
            done_ms: opt_u64(done),
        }))
    }

    /// Marks a rate-controlled job cancelled.
    pub fn cancel_rollout(&self, job_id: &str, now: u64) -> anyhow::Result<()> {
        self.exec(
            "UPDATE rollouts SET cancelled_ms = ?2 WHERE job_id = ?1 AND cancelled_ms IS NULL",
            params![job_id, to_i64(now)],
        )?;
        Ok(())
    }

    /// Marks a rate-controlled job done.
    pub fn finish_rollout(&self, job_id: &str, now: u64) -> anyhow::Result<()> {
        self.exec(
            "UPDATE rollouts SET done_ms = ?2 WHERE job_id = ?1 AND done_ms IS NULL",
            params![job_id, to_i64(now)],
        )?;
        Ok(())
    }

    /// Jobs in which this agent's target is not final yet.
    pub fn open_targets_of(&self, agent_id: &str) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT job_id FROM job_targets WHERE agent_id = ?1 AND result IS NULL AND state IN ('pending', 'delivered', 'in_progress')",
        )?;
        let rows = stmt.query_map(params![agent_id], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many targets of a job are in each state, and how many are done (final, or
    /// with a result): a cheap question for pollers, which need no outputs.
    pub fn progress_of(&self, job_id: &str) -> anyhow::Result<(usize, usize)> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN result IS NOT NULL OR state NOT IN ('pending', 'delivered', 'in_progress') THEN 1 ELSE 0 END), 0) FROM job_targets WHERE job_id = ?1",
            params![job_id],
            |r| Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize)),
        )?)
    }

    /// Each target's agent, state and detail, and whether it is done, without results.
    pub fn target_states(&self, job_id: &str) -> anyhow::Result<Vec<TargetBrief>> {
        let conn = self.conn();
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

    /// Targets per state of a job.
    pub fn state_counts(
        &self,
        job_id: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT state, COUNT(*) FROM job_targets WHERE job_id = ?1 GROUP BY state",
        )?;
        let mut counts: std::collections::BTreeMap<String, usize> = TargetState::ALL
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

    /// Recent jobs, newest first.
    pub fn jobs(&self, limit: u32) -> anyhow::Result<Vec<JobRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, plugin, version, targets, input, created_ms, expires_ms FROM jobs ORDER BY created_ms DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], job_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a result, at most once per (agent, job, attempt).
    ///
    /// One transaction notes that the agent was heard from, stores the result and, when
    /// it is stored, appends `audit` (its actor, action, target and outcome come from the
    /// result) to the audit log.
    pub fn record_result(&self, r: &JobResult, now: u64, audit: &str) -> anyhow::Result<Recorded> {
        let mut one = self.record_results(&[(r, audit)], now)?;
        Ok(one.pop().expect("one outcome for one result"))
    }

    /// [`record_result`](Self::record_result) for several results, in one transaction:
    /// what a burst of results costs the database is one commit. The outcomes are in
    /// the order of `results`.
    pub fn record_results(
        &self,
        results: &[(&JobResult, &str)],
        now: u64,
    ) -> anyhow::Result<Vec<Recorded>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut outcomes = Vec::with_capacity(results.len());
        for &(r, audit) in results {
            tx.prepare_cached(TOUCH_AGENT)?
                .execute(params![r.agent_id, to_i64(now)])?;
            let current: Option<(u32, bool)> = tx
                .prepare_cached(
                    "SELECT attempt, result IS NOT NULL FROM job_targets WHERE job_id = ?1 AND agent_id = ?2",
                )?
                .query_row(params![r.job_id, r.agent_id], |row| {
                    Ok((row.get(0)?, row.get::<_, bool>(1)?))
                })
                .optional()?;
            let recorded = match current {
                None => Recorded::NoTarget,
                Some((attempt, _)) if attempt != r.attempt => Recorded::NoTarget,
                Some((_, true)) => Recorded::Duplicate,
                Some((_, false)) => {
                    let (state, detail) = crate::rollout::state_of(r);
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
                    tx.prepare_cached(INSERT_AUDIT)?.execute(params![
                        to_i64(now),
                        format!("agent:{}", r.agent_id),
                        "job.execute",
                        r.job_id,
                        r.status.as_str(),
                        audit
                    ])?;
                    Recorded::Stored
                }
            };
            outcomes.push(recorded);
        }
        tx.commit()?;
        Ok(outcomes)
    }

    /// A job.
    pub fn job(&self, id: &str) -> anyhow::Result<Option<JobRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, plugin, version, targets, input, created_ms, expires_ms FROM jobs WHERE id = ?1",
                params![id],
                job_row,
            )
            .optional()?)
    }

    /// A job's targets, by agent id.
    pub fn targets(&self, job_id: &str) -> anyhow::Result<Vec<TargetRow>> {
        self.targets_since(job_id, 0)
    }

    /// A job's targets updated at or after `since_ms`, by agent id.
    pub fn targets_since(&self, job_id: &str, since_ms: u64) -> anyhow::Result<Vec<TargetRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT agent_id, attempt, status, result, updated_ms, state, detail, dispatched_ms, started_ms, finished_ms FROM job_targets WHERE job_id = ?1 AND updated_ms >= ?2 ORDER BY agent_id",
        )?;
        let rows = stmt.query_map(params![job_id, to_i64(since_ms)], |r| {
            let result: Option<String> = r.get(3)?;
            let state: String = r.get(5)?;
            Ok(TargetRow {
                agent_id: r.get(0)?,
                attempt: r.get(1)?,
                status: r.get(2)?,
                state: TargetState::parse(&state).unwrap_or(TargetState::Pending),
                detail: r.get(6)?,
                result: result.and_then(|t| serde_json::from_str(&t).ok()),
                updated_ms: r.get::<_, i64>(4)? as u64,
                dispatched_ms: opt_u64(r.get(7)?),
                started_ms: opt_u64(r.get(8)?),
                finished_ms: opt_u64(r.get(9)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- events ----

    /// Records an event.
    pub fn add_event(
        &self,
        agent_id: &str,
        kind: &str,
        message: &str,
        now: u64,
    ) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO events (at_ms, agent_id, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![to_i64(now), agent_id, kind, message],
        )?;
        Ok(())
    }

    /// Events, newest last; optionally for one agent.
    pub fn events(&self, agent_id: Option<&str>, limit: u32) -> anyhow::Result<Vec<EventRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at_ms, agent_id, kind, message FROM events
             WHERE ?1 IS NULL OR agent_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![agent_id, limit], |r| {
            Ok(EventRow {
                id: r.get(0)?,
                at_ms: r.get::<_, i64>(1)? as u64,
                agent_id: r.get(2)?,
                kind: r.get(3)?,
                message: r.get(4)?,
            })
        })?;
        let mut v: Vec<EventRow> = rows.collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    // ---- activations and agent keys ----

    /// Stores a new activation.
    pub fn create_activation(
        &self,
        a: &ActivationRow,
        salt: &[u8],
        code_hash: &[u8],
    ) -> anyhow::Result<()> {
        self.exec(
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

    fn activation_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredActivation> {
        Ok((
            ActivationRow {
                id: r.get(0)?,
                agent_id: r.get(3)?,
                tags: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                max_uses: r.get(5)?,
                uses: r.get(6)?,
                created_ms: r.get::<_, i64>(7)? as u64,
                expires_ms: r.get::<_, i64>(8)? as u64,
                revoked_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
            },
            r.get(1)?,
            r.get(2)?,
        ))
    }

    /// An activation with its salt and code hash.
    pub fn activation(&self, id: &str) -> anyhow::Result<Option<StoredActivation>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, salt, code_hash, agent_id, tags, max_uses, uses, created_ms, expires_ms, revoked_ms FROM activations WHERE id = ?1",
                params![id],
                Self::activation_from_row,
            )
            .optional()?)
    }

    /// All activations, newest first.
    pub fn activations(&self) -> anyhow::Result<Vec<ActivationRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, salt, code_hash, agent_id, tags, max_uses, uses, created_ms, expires_ms, revoked_ms FROM activations ORDER BY created_ms DESC",
        )?;
        let rows = stmt.query_map([], Self::activation_from_row)?;
        Ok(rows
            .map(|r| r.map(|(a, _, _)| a))
            .collect::<Result<_, _>>()?)
    }

    /// Revokes an activation; false if there is none.
    pub fn revoke_activation(&self, id: &str, now: u64) -> anyhow::Result<bool> {
        Ok(self.exec(
            "UPDATE activations SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, to_i64(now)],
        )? > 0)
    }

    /// Uses an activation once, if it still has uses; false if it has none left.
    pub fn use_activation(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.exec(
            "UPDATE activations SET uses = uses + 1 WHERE id = ?1 AND uses < max_uses",
            params![id],
        )? > 0)
    }

    /// Records an agent's enrolled keys (replacing earlier ones).
    pub fn put_agent_keys(&self, k: &AgentKeys, now: u64) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO agent_keys (agent_id, signing_key, sealing_key, activation_id, enrolled_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(agent_id) DO UPDATE SET signing_key = ?2, sealing_key = ?3, activation_id = ?4, enrolled_ms = ?5",
            params![k.agent_id, k.signing_key.to_hex(), k.sealing_key, k.activation_id, to_i64(now)],
        )?;
        Ok(())
    }

    /// An agent's enrolled keys.
    pub fn agent_keys(&self, agent_id: &str) -> anyhow::Result<Option<AgentKeys>> {
        let row: Option<(String, String, String, String)> = self
            .conn()
            .query_row(
                "SELECT agent_id, signing_key, sealing_key, activation_id FROM agent_keys WHERE agent_id = ?1",
                params![agent_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(agent_id, sk, sealing_key, activation_id)| {
            Ok(AgentKeys {
                agent_id,
                signing_key: drover_protocol::keys::PublicKey::from_hex(&sk)?,
                sealing_key,
                activation_id,
            })
        })
        .transpose()
    }

    // ---- audit ----

    /// Appends to the audit log.
    pub fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: &str,
        now: u64,
    ) -> anyhow::Result<()> {
        self.exec(
            INSERT_AUDIT,
            params![to_i64(now), actor, action, target, outcome, detail],
        )?;
        Ok(())
    }

    /// Reads the audit log, newest last, filtered.
    pub fn audit_log(&self, f: &AuditFilter) -> anyhow::Result<Vec<AuditRow>> {
        let conn = self.conn();
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
                Ok(AuditRow {
                    id: r.get(0)?,
                    at_ms: r.get::<_, i64>(1)? as u64,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    outcome: r.get(5)?,
                    detail: r.get(6)?,
                })
            },
        )?;
        let mut v: Vec<AuditRow> = rows.collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::job::FailureKind;

    fn job(store: &Store, id: &str, expires_ms: u64, agents: &[&str]) {
        let row = JobRow {
            id: id.into(),
            plugin: "p".into(),
            version: 1,
            targets: "all".into(),
            input: serde_json::Value::Null,
            created_ms: 1,
            expires_ms,
        };
        let agents: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
        store.create_job(&row, &agents, None).unwrap();
    }

    fn unanswered(store: &Store, agent: &str, now: u64) -> Vec<(String, Vec<u8>)> {
        store.unanswered_envelopes(agent, now, now).unwrap()
    }

    #[test]
    fn sent_envelopes_are_kept_until_their_target_is_answered() {
        let store = Store::open(Path::new(":memory:")).unwrap();
        job(&store, "j1", 1_000, &["a", "b", "c", "d"]);
        job(&store, "j2", 5_000, &["a"]);
        store
            .mark_sent(
                "j1",
                &[("a", b"env-1a"), ("b", b"env-1b"), ("c", b"env-1c")],
                10,
            )
            .unwrap();
        store.mark_sent("j2", &[("a", b"env-2a")], 10).unwrap();

        // Oldest job first; a target never sent (d) has nothing to send again.
        assert_eq!(
            unanswered(&store, "a", 20),
            vec![
                ("j1".into(), b"env-1a".to_vec()),
                ("j2".into(), b"env-2a".to_vec())
            ]
        );
        assert!(unanswered(&store, "d", 20).is_empty());
        // Sent since the agent came back: it went over the live session.
        assert!(store.unanswered_envelopes("a", 10, 20).unwrap().is_empty());
        // An expired job's envelope would be refused as stale: not sent again.
        assert_eq!(
            unanswered(&store, "a", 2_000),
            vec![("j2".into(), b"env-2a".to_vec())]
        );

        // Answered in any way (result, started, settled), it is forgotten.
        let r = JobResult::refused("j1", "a", 1, FailureKind::PluginError, "x".into());
        assert_eq!(
            store.record_result(&r, 30, "audit").unwrap(),
            Recorded::Stored
        );
        assert!(store.mark_started("j1", "b", 30).unwrap());
        store
            .settle("j1", "c", TargetState::TimedOut, "late", 30)
            .unwrap();
        assert_eq!(
            unanswered(&store, "a", 40),
            vec![("j2".into(), b"env-2a".to_vec())]
        );
        assert!(unanswered(&store, "b", 40).is_empty());
        assert!(unanswered(&store, "c", 40).is_empty());

        // A cancelled job is never sent again.
        store.forget_envelopes("j2").unwrap();
        assert!(unanswered(&store, "a", 40).is_empty());
    }

    #[test]
    fn cancel_requests_are_kept_until_their_target_is_answered() {
        let store = Store::open(Path::new(":memory:")).unwrap();
        job(&store, "j1", 1_000, &["a", "b"]);
        job(&store, "j2", 1_000, &["a"]);
        store
            .mark_sent("j1", &[("a", b"e"), ("b", b"e")], 10)
            .unwrap();
        store.mark_sent("j2", &[("a", b"e")], 10).unwrap();
        assert!(store.mark_started("j1", "a", 20).unwrap());
        for (job, agent) in [("j1", "a"), ("j1", "b"), ("j2", "a")] {
            store.mark_cancel_sent(job, agent, 30).unwrap();
        }
        assert_eq!(store.unanswered_cancels("a").unwrap(), ["j1", "j2"]);
        assert_eq!(store.unanswered_cancels("b").unwrap(), ["j1"]);

        let r = JobResult::refused("j1", "a", 1, FailureKind::Cancelled, "x".into());
        assert_eq!(
            store.record_result(&r, 40, "audit").unwrap(),
            Recorded::Stored
        );
        store
            .settle("j1", "b", TargetState::Undeliverable, "gone", 40)
            .unwrap();
        assert_eq!(store.unanswered_cancels("a").unwrap(), ["j2"]);
        assert!(store.unanswered_cancels("b").unwrap().is_empty());
        // A target with its answer is not asked again.
        store.mark_cancel_sent("j1", "a", 50).unwrap();
        assert_eq!(store.unanswered_cancels("a").unwrap(), ["j2"]);
    }

    #[test]
    fn a_database_from_before_kept_envelopes_is_upgraded() {
        let dir = std::env::temp_dir().join(format!("drover-store-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            // As an older server left it: every added column present but the envelope.
            let new = ["envelope", "cancel_ms"];
            for (table, column, decl) in ADDED_COLUMNS.iter().filter(|c| !new.contains(&c.1)) {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                    .unwrap();
            }
        }
        let store = Store::open(&path).unwrap();
        job(&store, "j1", 1_000, &["a"]);
        store.mark_sent("j1", &[("a", b"env")], 10).unwrap();
        assert_eq!(
            unanswered(&store, "a", 20),
            vec![("j1".into(), b"env".to_vec())]
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
