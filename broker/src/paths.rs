//! The server's data directory layout, and `server.json`, which tells the CLI where a
//! running server is.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// What a running server tells the CLI and tests: written to `server.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The HTTP API's base URL.
    pub api: String,
    /// The broker agents should connect to.
    pub broker: String,
    /// The embedded broker's TLS address, if any.
    pub broker_tls: Option<String>,
    /// The server's process id.
    pub pid: u32,
}

/// The data directory: database, keys, broker state, operator token.
#[derive(Debug, Clone)]
pub struct DataDir(PathBuf);

impl DataDir {
    /// Wraps a path.
    pub fn new(p: impl Into<PathBuf>) -> DataDir {
        DataDir(p.into())
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.0
    }

    /// Creates the directory (private to its owner).
    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.keys_dir())
            .with_context(|| format!("creating {}", self.0.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// `keys/`.
    pub fn keys_dir(&self) -> PathBuf {
        self.0.join("keys")
    }

    /// The publisher key.
    pub fn publisher_key(&self) -> PathBuf {
        self.keys_dir().join("publisher.key")
    }

    /// The control-plane key.
    pub fn control_plane_key(&self) -> PathBuf {
        self.keys_dir().join("control-plane.key")
    }

    /// The root key, which signs key sets.
    pub fn root_key(&self) -> PathBuf {
        self.keys_dir().join("root.key")
    }

    /// The current signed key set.
    pub fn keyset(&self) -> PathBuf {
        self.keys_dir().join("keyset.json")
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.0.join("drover.db")
    }

    /// The operator token file.
    pub fn api_token(&self) -> PathBuf {
        self.0.join("api-token")
    }

    /// `server.json`, written while the server runs.
    pub fn server_info(&self) -> PathBuf {
        self.0.join("server.json")
    }

    /// Reads the operator token, creating it if needed.
    pub fn ensure_api_token(&self) -> anyhow::Result<String> {
        let path = self.api_token();
        if !path.exists() {
            let token = crate::tokens::new_password();
            drover_protocol::durable::create_private(&path, token.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    }

    /// Writes `server.json`, whole or not at all.
    pub fn write_server_info(&self, info: &ServerInfo) -> anyhow::Result<()> {
        let path = self.server_info();
        drover_protocol::durable::replace(&path, &serde_json::to_vec_pretty(info)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads `server.json`.
    pub fn read_server_info(&self) -> anyhow::Result<ServerInfo> {
        let path = self.server_info();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no running server found ({} is missing; start one with `drover serve`)",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Removes `server.json`.
    pub fn remove_server_info(&self) {
        let _ = std::fs::remove_file(self.server_info());
    }
}
