//! The server's side of trust: the root-signed key set agents trust (on disk, in
//! [`files`]), the one the server holds now ([`Trust`]), and the keys and rotations
//! operators make (`drover keygen`, `drover keyset`).

use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use drover_protocol::keyset::KeySet;
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Down};

use crate::mqtt::publisher::{Delivery, Link};
use crate::paths::DataDir;

pub mod cli;
pub mod files;

/// The key set agents should hold, and how it reaches them; clones share it.
#[derive(Clone)]
pub struct Trust {
    data: DataDir,
    current: Arc<RwLock<Signed<KeySet>>>,
    link: Link,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trust")
    }
}

impl Trust {
    /// Holds `current` (read from `data`), and sends key sets over `link`.
    pub fn new(data: DataDir, current: Signed<KeySet>, link: Link) -> Trust {
        Trust {
            data,
            current: Arc::new(RwLock::new(current)),
            link,
        }
    }

    /// The key set agents should hold.
    pub fn keyset(&self) -> Signed<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current key set's version.
    pub fn version(&self) -> u64 {
        self.keyset().unverified().map(|k| k.version).unwrap_or(0)
    }

    /// Checks `next` as an agent would (a higher version, signed by enough current
    /// roots), stores it durably, and holds it from now on. Returns it, checked.
    pub fn adopt(&self, next: Signed<KeySet>) -> Result<KeySet, AdoptError> {
        let current = self
            .keyset()
            .unverified()
            .context("the current key set is unreadable")
            .map_err(AdoptError::Internal)?;
        let ks = current
            .verify_successor(&next)
            .map_err(|e| AdoptError::Refused(e.to_string()))?;
        files::store(&self.data, &next).map_err(AdoptError::Internal)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(ks)
    }

    /// Sends the current key set to one agent.
    pub async fn send_to(&self, agent: &str) {
        let body = serde_json::to_vec(&self.keyset()).expect("key sets serialise");
        if let Err(e) = self
            .link
            .publish(
                topics::down(agent, Down::Keyset),
                body,
                Delivery::AtLeastOnce,
            )
            .await
        {
            tracing::warn!(agent.id = %agent, error = %format!("{e:#}"), "could not send key set");
        }
    }
}

/// Why a key set was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// Agents would refuse it.
    #[error("{0}")]
    Refused(String),
    /// The server failed.
    #[error(transparent)]
    Internal(anyhow::Error),
}
