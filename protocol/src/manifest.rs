//! Plugin manifests: what a publisher signs about a component.

use serde::{Deserialize, Serialize};

use crate::signed::Signable;

/// The WIT world a plugin implements (see `wit/worlds.wit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    /// `inventory-collector`: returns typed inventory.
    InventoryCollector,
    /// `task`: JSON in, JSON out.
    Task,
}

impl World {
    /// The world's name in `wit/`.
    pub fn as_str(self) -> &'static str {
        match self {
            World::InventoryCollector => "inventory-collector",
            World::Task => "task",
        }
    }
}

impl std::str::FromStr for World {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inventory-collector" => Ok(World::InventoryCollector),
            "task" => Ok(World::Task),
            other => Err(format!(
                "unknown world {other:?}; expected inventory-collector or task"
            )),
        }
    }
}

/// What a plugin asks to be granted. Everything absent is denied.
///
/// Unknown fields are an error, not ignored: a manifest asking for a capability this agent
/// does not know is refused rather than run with less than it expects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// The `host-facts` import returns facts instead of `none`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_facts: bool,
    /// Absolute host directories the plugin may read, mounted read-only at the same path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_paths: Vec<String>,
}

impl Capabilities {
    /// Whether nothing is asked for.
    pub fn is_empty(&self) -> bool {
        !self.host_facts && self.read_paths.is_empty()
    }

    /// Human-readable list, for logs and errors.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.host_facts {
            out.push("host-facts".to_string());
        }
        for p in &self.read_paths {
            out.push(format!("read:{p}"));
        }
        out
    }
}

/// A plugin manifest, as signed by a publisher key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name: 1–64 characters of `[a-z0-9-]`.
    pub name: String,
    /// Strictly increasing per name.
    pub version: u64,
    /// SHA-256 of the component, lowercase hex.
    pub sha256: String,
    /// The component's length in bytes.
    pub length: u64,
    /// The WIT world it implements.
    pub world: World,
    /// What it asks to be granted.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// When it was signed, Unix seconds.
    pub issued_at: u64,
    /// After this (Unix seconds), agents refuse to install it.
    pub expires_at: u64,
}

impl Signable for Manifest {
    const CONTEXT: &'static str = "plugin-manifest-v1";
}

/// Plugin names are 1–64 characters of `[a-z0-9-]`, not starting with `-`.
pub fn is_valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

impl Manifest {
    /// Checks the fields a signature cannot: name syntax, digest syntax, read paths.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_plugin_name(&self.name) {
            return Err(format!("invalid plugin name {:?}", self.name));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hex characters".into());
        }
        for p in &self.capabilities.read_paths {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(format!(
                    "read path {p:?} must be absolute and must not contain '..'"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_capabilities_are_refused() {
        let err = serde_json::from_str::<Capabilities>(r#"{"network":true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn validate_refuses_bad_fields() {
        let mut m = Manifest {
            name: "inventory".into(),
            version: 1,
            sha256: "a".repeat(64),
            length: 1,
            world: World::Task,
            capabilities: Capabilities::default(),
            issued_at: 0,
            expires_at: 1,
        };
        assert!(m.validate().is_ok());
        m.capabilities.read_paths = vec!["/var/../etc".into()];
        assert!(m.validate().is_err());
        m.capabilities.read_paths = vec!["etc".into()];
        assert!(m.validate().is_err());
        m.capabilities.read_paths.clear();
        m.name = "Bad/Name".into();
        assert!(m.validate().is_err());
    }
}
