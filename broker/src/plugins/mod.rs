//! The plugin catalogue: signed manifests and their components, published by operators
//! and fetched by agents in chunks.
//!
//! - [`chunks`]: serving a component to an agent over MQTT, within bounds.
//! - [`store`], [`types`], [`routes`], [`cli`]: its tables, API types, routes and
//!   `drover plugin` group.

use std::sync::Arc;

use base64::Engine as _;
use drover_protocol::manifest::sha256_hex;

use crate::audit::Audit;
use crate::capability::Capability;
use crate::clock::Clock;
use crate::mqtt::publisher::Link;
use crate::store::Db;

pub mod chunks;
pub mod cli;
pub mod routes;
pub mod store;
pub mod types;

pub use types::Plugin;

struct Shared {
    db: Db,
    link: Link,
    audit: Audit,
    clock: Clock,
    fetches: chunks::Fetches,
}

/// The catalogue's handle; clones share it.
#[derive(Clone)]
pub struct Plugins {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plugins")
    }
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The upload is not self-consistent.
    #[error("{0}")]
    Invalid(String),
    /// That version (or a newer one) is published already.
    #[error("{0}")]
    NotNewer(String),
    /// The server failed.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Capability for Plugins {
    fn routes(&self) -> utoipa_axum::router::OpenApiRouter {
        routes::routes(self.clone())
    }
}

impl Plugins {
    /// The catalogue in `db`; components go out over `link`.
    pub fn new(db: Db, link: Link, audit: Audit, clock: Clock) -> Plugins {
        Plugins {
            shared: Arc::new(Shared {
                db,
                link,
                audit,
                clock,
                fetches: chunks::Fetches::default(),
            }),
        }
    }

    /// A plugin by name and version (the newest when `version` is `None`).
    pub async fn get(&self, name: &str, version: Option<u64>) -> anyhow::Result<Option<Plugin>> {
        store::get(&self.shared.db, name, version).await
    }

    /// Every published plugin.
    pub async fn list(&self) -> anyhow::Result<Vec<Plugin>> {
        store::list(&self.shared.db).await
    }

    /// Stores a plugin whose manifest is signed by every key that signed it and whose
    /// component matches it. Which publishers to trust, and how many are needed, is each
    /// agent's decision, not the server's.
    pub async fn publish(
        &self,
        req: types::PublishRequest,
    ) -> Result<types::Published, PublishError> {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(&req.blob_base64)
            .map_err(|e| PublishError::Invalid(format!("blob is not base64: {e}")))?;
        let mut signers: Vec<_> = req.manifest.signatures.iter().map(|s| s.key).collect();
        signers.sort();
        signers.dedup();
        let m = req
            .manifest
            .verify_threshold(&signers, signers.len())
            .map_err(|e| PublishError::Invalid(format!("manifest refused: {e}")))?;
        m.validate()
            .map_err(|e| PublishError::Invalid(format!("manifest refused: {e}")))?;
        if blob.len() as u64 != m.length || sha256_hex(&blob) != m.sha256 {
            return Err(PublishError::Invalid(
                "the component does not match the manifest's length and sha256".into(),
            ));
        }
        let db = &self.shared.db;
        if let Some(latest) = store::latest_version(db, &m.name).await?
            && m.version <= latest
        {
            return Err(PublishError::NotNewer(format!(
                "plugin {} version {} is not newer than the published version {latest}",
                m.name, m.version
            )));
        }
        store::put(db, &m, &req.manifest, &blob, self.shared.clock.now_ms()).await?;
        tracing::info!(plugin = %m.name, version = m.version, sha256 = %m.sha256, "plugin published");
        self.shared
            .audit
            .record(
                "operator",
                "plugin.publish",
                &format!("{} v{}", m.name, m.version),
                "ok",
                &format!("sha256 {}", m.sha256),
            )
            .await;
        Ok(types::Published {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
        })
    }
}
