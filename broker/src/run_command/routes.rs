//! Run Command's routes: run a command, list commands, one command's summary. A
//! command's targets and outputs are its job's (`/api/v1/jobs/{id}`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::RunCommand;
use super::types::{CommandListQuery, CommandRequest, CommandSummary};
use crate::api::error::{ApiError, ErrorBody, ErrorCode, Json, Query};
use crate::jobs::routes::audited;
use crate::jobs::types::JobCreated;

/// Run Command's routes.
pub fn routes(rc: RunCommand) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_commands, create_command))
        .routes(routes!(get_command))
        .with_state(rc)
}

/// Runs a program or a shell script across agents, with rate control, a deadline that
/// kills its process tree, and full output.
#[utoipa::path(post, path = "/api/v1/commands", tag = "run-command",
    request_body = CommandRequest,
    responses(
        (status = 201, description = "Created: follow it at /api/v1/jobs/{job_id}", body = JobCreated),
        (status = 400, description = "The request is wrong", body = ErrorBody),
        (status = 404, description = "No command runner, or no agents match", body = ErrorBody),
    ))]
async fn create_command(
    State(rc): State<RunCommand>,
    Json(req): Json<CommandRequest>,
) -> Result<(StatusCode, Json<JobCreated>), ApiError> {
    let what = format!("{} on {}", req.describe(), req.targets);
    audited(&rc.audit, "command.create", &what, rc.create(req).await).await
}

/// Lists recent commands, newest first: what each ran, and its targets' states and exit
/// codes.
#[utoipa::path(get, path = "/api/v1/commands", tag = "run-command",
    params(CommandListQuery),
    responses((status = 200, description = "Recent commands", body = Vec<CommandSummary>)))]
async fn list_commands(
    State(rc): State<RunCommand>,
    Query(q): Query<CommandListQuery>,
) -> Result<Json<Vec<CommandSummary>>, ApiError> {
    Ok(Json(rc.list(q.limit.unwrap_or(20).min(1000)).await?))
}

/// One command's summary: its targets' states and exit codes.
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "run-command",
    params(("id" = String, Path, description = "The command's id")),
    responses(
        (status = 200, description = "The command", body = CommandSummary),
        (status = 404, description = "No such command", body = ErrorBody),
    ))]
async fn get_command(
    State(rc): State<RunCommand>,
    Path(id): Path<String>,
) -> Result<Json<CommandSummary>, ApiError> {
    rc.get(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::NoSuchJob, format!("no command {id}")))
}
