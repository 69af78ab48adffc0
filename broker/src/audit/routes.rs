//! `GET /api/v1/audit`.

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Audit, AuditEntry, AuditFilter};
use crate::api::error::{ApiError, ErrorBody, Json, Query};

/// The audit log's routes.
pub fn routes(audit: Audit) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(read_log))
        .with_state(audit)
}

/// Reads the audit log, newest last, filtered.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    params(AuditFilter),
    responses(
        (status = 200, description = "Matching entries, newest last", body = Vec<AuditEntry>),
        (status = 400, description = "A filter does not parse", body = ErrorBody),
    )
)]
async fn read_log(
    State(audit): State<Audit>,
    Query(f): Query<AuditFilter>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    Ok(Json(audit.read(&f).await?))
}
