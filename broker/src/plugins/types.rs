//! The plugin catalogue's API types.

use drover_protocol::manifest::Manifest;
use drover_protocol::openapi::SignedDoc;
use drover_protocol::signed::Signed;
use serde::{Deserialize, Serialize};

/// A published plugin.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Plugin {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// The component's SHA-256, hex.
    pub sha256: String,
    /// The component's length in bytes.
    pub length: u64,
    /// The WIT world it implements.
    pub world: String,
    /// When published, Unix ms.
    pub published_ms: u64,
    /// The signed manifest.
    #[schema(value_type = SignedDoc)]
    pub manifest: Signed<Manifest>,
}

/// A plugin upload.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishRequest {
    /// The signed manifest.
    #[schema(value_type = SignedDoc)]
    pub manifest: Signed<Manifest>,
    /// The component, base64.
    pub blob_base64: String,
}

/// What publishing stored.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Published {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// The component's SHA-256, hex.
    pub sha256: String,
}
