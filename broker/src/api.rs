//! The HTTP API, on loopback by default. Every route but `/healthz` needs the operator
//! token (`Authorization: Bearer ...`), which the server writes to its data directory.

use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use drover_protocol::manifest::{Manifest, sha256_hex};
use drover_protocol::signed::Signed;
use serde::{Deserialize, Serialize};

use crate::control::{ControlError, ControlPlane, JobRequest};
use crate::credentials::BrokerAuth;
use crate::store::{JobRow, TargetRow};

/// Shared state of the API.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The control plane.
    pub control: ControlPlane,
    /// The operator token.
    pub token: String,
}

/// An error as the API returns it: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::BadRequest(m) => ApiError(StatusCode::BAD_REQUEST, m),
            ControlError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            ControlError::Internal(e) => internal(e),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        internal(e)
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{e:#}"), "API request failed");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The routes.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{id}/credentials", post(create_credentials))
        .route("/api/v1/plugins", get(list_plugins).post(publish_plugin))
        .route("/api/v1/jobs", post(create_job))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/events", get(list_events))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(api)
        .with_state(state)
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            ring::digest::digest(&ring::digest::SHA256, t.as_bytes()).as_ref()
                == ring::digest::digest(&ring::digest::SHA256, state.token.as_bytes()).as_ref()
        });
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong operator token".into(),
        )
        .into_response();
    }
    next.run(req).await
}

async fn list_agents(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(s.control.store().agents()?).into_response())
}

/// The answer to a credentials request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Credentials {
    /// The MQTT username (the agent id).
    pub username: String,
    /// The MQTT password. Shown once; the server keeps only a hash.
    pub password: String,
}

async fn create_credentials(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Credentials>, ApiError> {
    let password =
        BrokerAuth::create_agent(s.control.store(), &id).map_err(|e| bad(format!("{e:#}")))?;
    tracing::info!(agent.id = %id, "agent broker credential created");
    Ok(Json(Credentials {
        username: id,
        password,
    }))
}

async fn list_plugins(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(s.control.store().plugins()?).into_response())
}

/// A plugin upload.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The signed manifest.
    pub manifest: Signed<Manifest>,
    /// The component, base64.
    pub blob_base64: String,
}

async fn publish_plugin(
    State(s): State<ApiState>,
    Json(req): Json<PublishRequest>,
) -> Result<Response, ApiError> {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(&req.blob_base64)
        .map_err(|e| bad(format!("blob is not base64: {e}")))?;
    // The server checks the upload is self-consistent; which publishers to trust is each
    // agent's decision, not the server's.
    let m = req
        .manifest
        .verify(&[req.manifest.key])
        .map_err(|e| bad(format!("manifest refused: {e}")))?;
    m.validate()
        .map_err(|e| bad(format!("manifest refused: {e}")))?;
    if blob.len() as u64 != m.length || sha256_hex(&blob) != m.sha256 {
        return Err(bad(
            "the component does not match the manifest's length and sha256",
        ));
    }
    let store = s.control.store();
    if let Some(latest) = store.latest_version(&m.name)?
        && m.version <= latest
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "plugin {} version {} is not newer than the published version {latest}",
                m.name, m.version
            ),
        ));
    }
    store.put_plugin(&m, &req.manifest, &blob, drover_protocol::now_ms())?;
    tracing::info!(plugin = %m.name, version = m.version, sha256 = %m.sha256, "plugin published");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "name": m.name, "version": m.version, "sha256": m.sha256 })),
    )
        .into_response())
}

async fn create_job(
    State(s): State<ApiState>,
    Json(req): Json<JobRequest>,
) -> Result<Response, ApiError> {
    let created = s.control.submit(req).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Long-poll parameters for a job.
#[derive(Debug, Deserialize)]
pub struct JobQuery {
    /// Wait up to this long for more results than `done`.
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// How many results the caller already has.
    #[serde(default)]
    pub done: Option<usize>,
}

/// A job with its targets.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    /// The job.
    pub job: JobRow,
    /// Its targets.
    pub targets: Vec<TargetRow>,
}

async fn get_job(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Json<JobView>, ApiError> {
    let store = s.control.store();
    let mut changed = s.control.results_changed();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.unwrap_or(0).min(60_000));
    loop {
        let job = store
            .job(&id)?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))?;
        let targets = store.targets(&id)?;
        let done = targets.iter().filter(|t| t.is_done()).count();
        let all_done = done == targets.len();
        if all_done
            || done > q.done.unwrap_or(usize::MAX)
            || tokio::time::Instant::now() >= deadline
        {
            return Ok(Json(JobView { job, targets }));
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            continue;
        }
    }
}

/// Event filters.
#[derive(Debug, Deserialize)]
pub struct EventQuery {
    /// One agent's events.
    pub agent: Option<String>,
    /// At most this many (default 100).
    pub limit: Option<u32>,
}

async fn list_events(
    State(s): State<ApiState>,
    Query(q): Query<EventQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(
        s.control
            .store()
            .events(q.agent.as_deref(), q.limit.unwrap_or(100).min(10_000))?,
    )
    .into_response())
}
