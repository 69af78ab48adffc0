//! SQL of the plugin catalogue: `plugins` and `blobs`.

use drover_protocol::manifest::Manifest;
use drover_protocol::signed::Signed;
use rusqlite::{OptionalExtension as _, params};

use super::types::Plugin;
use crate::store::{Db, Schema, to_i64, to_u64};

/// The catalogue's tables.
pub const SCHEMA: Schema = Schema {
    name: "plugins",
    migrations: &[("V1__plugins", include_str!("migrations/V1__plugins.sql"))],
};

const COLUMNS: &str = "name, version, sha256, length, world, manifest, published_ms";

fn plugin_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Plugin> {
    let manifest_text: String = r.get(5)?;
    let manifest = serde_json::from_str(&manifest_text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Plugin {
        name: r.get(0)?,
        version: to_u64(r.get(1)?),
        sha256: r.get(2)?,
        length: to_u64(r.get(3)?),
        world: r.get(4)?,
        published_ms: to_u64(r.get(6)?),
        manifest,
    })
}

/// The newest version of a plugin.
pub async fn latest_version(db: &Db, name: &str) -> anyhow::Result<Option<u64>> {
    Ok(db
        .conn()
        .await
        .query_row(
            "SELECT MAX(version) FROM plugins WHERE name = ?1",
            params![name],
            |r| r.get::<_, Option<i64>>(0),
        )?
        .map(to_u64))
}

/// Stores a plugin and its blob.
pub async fn put(
    db: &Db,
    m: &Manifest,
    signed: &Signed<Manifest>,
    blob: &[u8],
    now: u64,
) -> anyhow::Result<()> {
    let tx = db.begin().await?;
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

/// A plugin by name and version (the newest when `version` is `None`).
pub async fn get(db: &Db, name: &str, version: Option<u64>) -> anyhow::Result<Option<Plugin>> {
    let conn = db.conn().await;
    Ok(match version {
        Some(v) => conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM plugins WHERE name = ?1 AND version = ?2"
            ))?
            .query_row(params![name, to_i64(v)], plugin_from_row)
            .optional()?,
        None => conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM plugins WHERE name = ?1 ORDER BY version DESC LIMIT 1"
            ))?
            .query_row(params![name], plugin_from_row)
            .optional()?,
    })
}

/// All plugins, by name and version.
pub async fn list(db: &Db) -> anyhow::Result<Vec<Plugin>> {
    let conn = db.conn().await;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM plugins ORDER BY name, version"
    ))?;
    let rows = stmt.query_map([], plugin_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A blob by digest.
pub async fn blob(db: &Db, sha256: &str) -> anyhow::Result<Option<Vec<u8>>> {
    Ok(db
        .conn()
        .await
        .prepare_cached("SELECT bytes FROM blobs WHERE sha256 = ?1")?
        .query_row(params![sha256], |r| r.get(0))
        .optional()?)
}
