//! What a capability brings to the server: its routes and its consumers of the event
//! log. `server.rs` collects them from each capability; the API and the event log never
//! name one.

use std::sync::Arc;

use utoipa_axum::router::OpenApiRouter;

use crate::events::Consumer;

/// A capability, as the server composes it.
pub trait Capability {
    /// Its routes that need the operator token.
    fn routes(&self) -> OpenApiRouter;

    /// Its routes open to anyone who can reach the API (enrollment, authenticated by
    /// its own code).
    fn public_routes(&self) -> Option<OpenApiRouter> {
        None
    }

    /// Its consumers of the event log.
    fn consumers(&self) -> Vec<Arc<dyn Consumer>> {
        Vec::new()
    }
}
