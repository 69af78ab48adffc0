//! The database every capability keeps its tables in, and how their schemas evolve.
//!
//! [`Db`] is one SQLite file (WAL mode) behind an async lock: every statement is short,
//! so a caller holds it for microseconds, and a pool would add nothing on one file. A
//! PostgreSQL backend comes next, behind the same methods.
//!
//! Each capability owns its tables: its `store.rs` holds all of its SQL (nothing outside
//! a store module sees a SQLite type or an SQL string), and its [`Schema`] lists its
//! numbered, forward-only migrations, recorded in a history table of its own
//! (`schema_<name>`), so adding a capability never renumbers another's. A statement that
//! must be atomic with another capability's goes through a [`Tx`] handed to that
//! capability's store function (`..._in(tx, ...)`).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rusqlite::Connection;
use tokio::sync::{Mutex, MutexGuard};

mod legacy;

/// How many prepared statements the connection keeps.
const STATEMENT_CACHE: usize = 96;

/// A capability's schema: its name and its migrations, oldest first.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The capability, as in its history table `schema_<name>`.
    pub name: &'static str,
    /// `(V<n>__<what>, SQL)`, numbered from 1 without gaps.
    pub migrations: &'static [(&'static str, &'static str)],
}

/// The database handle; clones share one connection.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

/// The connection, held for a few statements.
pub struct Conn<'a>(MutexGuard<'a, Connection>);

impl Deref for Conn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0
    }
}

/// A transaction: [`Tx::commit`] keeps what it did; dropped without it, it is rolled back.
pub struct Tx<'a> {
    conn: MutexGuard<'a, Connection>,
    open: bool,
}

impl Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Tx<'_> {
    /// Makes the transaction's writes permanent.
    pub fn commit(mut self) -> anyhow::Result<()> {
        self.open = false;
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path`. Call [`Db::migrate`] next.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        Db::configure(conn)
    }

    /// A database in memory, for tests.
    pub fn in_memory() -> anyhow::Result<Db> {
        Db::configure(Connection::open_in_memory()?)
    }

    fn configure(conn: Connection) -> anyhow::Result<Db> {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
        )?;
        // Every statement on the hot paths is prepared once and kept.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Brings every capability's tables up to date, in the order given (a capability
    /// whose tables refer to another's comes after it). A database made before numbered
    /// migrations is first adopted as it stands (see `legacy.rs`).
    pub async fn migrate(&self, schemas: &[Schema]) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().await;
        legacy::adopt(&mut conn).context("adopting a database from before migrations")?;
        for schema in schemas {
            let migrations = schema
                .migrations
                .iter()
                .map(|(name, sql)| refinery::Migration::unapplied(name, sql))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading the {} migrations", schema.name))?;
            let mut runner = refinery::Runner::new(&migrations).set_abort_divergent(true);
            runner.set_migration_table_name(format!("schema_{}", schema.name));
            let report = runner
                .run(&mut *conn)
                .with_context(|| format!("migrating the {} tables", schema.name))?;
            for m in report.applied_migrations() {
                tracing::info!(capability = schema.name, migration = %m, "schema migrated");
            }
        }
        Ok(())
    }

    /// The schema version of each capability: its newest applied migration.
    pub async fn schema_versions(&self, schemas: &[Schema]) -> anyhow::Result<Vec<(String, u32)>> {
        let conn = self.conn.lock().await;
        let mut out = Vec::new();
        for s in schemas {
            let v: Option<u32> = conn
                .query_row(
                    &format!("SELECT MAX(version) FROM schema_{}", s.name),
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(None);
            out.push((s.name.to_string(), v.unwrap_or(0)));
        }
        Ok(out)
    }

    /// The connection, for a few statements.
    pub async fn conn(&self) -> Conn<'_> {
        Conn(self.conn.lock().await)
    }

    /// The connection from code outside the async runtime (the CLI's own reads).
    pub fn blocking_conn(&self) -> Conn<'_> {
        Conn(self.conn.blocking_lock())
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> anyhow::Result<Tx<'_>> {
        let conn = self.conn.lock().await;
        conn.execute_batch("BEGIN")?;
        Ok(Tx { conn, open: true })
    }
}

/// A `u64` as SQLite's `i64` (saturating: times and sizes never get there).
pub fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// An `i64` column as `u64` (negatives, which we never write, as 0).
pub fn to_u64(v: i64) -> u64 {
    v.max(0) as u64
}

/// An optional `i64` column as `u64`.
pub fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(to_u64)
}

#[cfg(test)]
mod tests;
