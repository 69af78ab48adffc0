//! The catalogue's routes: list and publish.

use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::types::{Plugin, PublishRequest, Published};
use super::{Plugins, PublishError};
use crate::api::error::{ApiError, ErrorBody, ErrorCode, Json};

/// The catalogue's routes.
pub fn routes(plugins: Plugins) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_plugins, publish_plugin))
        .with_state(plugins)
}

/// Lists every published plugin, by name and version.
#[utoipa::path(get, path = "/api/v1/plugins", tag = "plugins",
    responses((status = 200, description = "Published plugins", body = Vec<Plugin>)))]
async fn list_plugins(State(p): State<Plugins>) -> Result<Json<Vec<Plugin>>, ApiError> {
    Ok(Json(p.list().await?))
}

/// Publishes a plugin: its signed manifest and its component. The version must be newer
/// than any published before.
#[utoipa::path(post, path = "/api/v1/plugins", tag = "plugins",
    request_body = PublishRequest,
    responses(
        (status = 201, description = "Published", body = Published),
        (status = 400, description = "The upload is not self-consistent", body = ErrorBody),
        (status = 409, description = "Not newer than the published version", body = ErrorBody),
    ))]
async fn publish_plugin(
    State(p): State<Plugins>,
    Json(req): Json<PublishRequest>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    match p.publish(req).await {
        Ok(published) => Ok((StatusCode::CREATED, Json(published))),
        Err(PublishError::Invalid(m)) => Err(ApiError::bad(m)),
        Err(PublishError::NotNewer(m)) => Err(ApiError::new(ErrorCode::Conflict, m)),
        Err(PublishError::Internal(e)) => Err(ApiError::internal(e)),
    }
}
