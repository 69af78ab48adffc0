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
use crate::store::JobRow;

/// Shared state of the API.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The control plane.
    pub control: ControlPlane,
    /// The operator token.
    pub token: String,
    /// The data directory.
    pub data: crate::paths::DataDir,
    /// The broker URL enrolled agents are told to dial.
    pub broker_url: String,
    /// The embedded broker, to drop deregistered agents; None with an external broker.
    pub broker: Option<crate::embedded::BrokerAccess>,
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
        .route("/api/v1/agents/{id}/deregister", post(deregister_agent))
        .route("/api/v1/plugins", get(list_plugins).post(publish_plugin))
        .route("/api/v1/jobs", get(list_jobs).post(create_job))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/jobs/{id}/live", get(live_job))
        .route("/api/v1/commands", post(create_command))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/keyset", get(get_keyset).post(put_keyset))
        .route(
            "/api/v1/activations",
            get(list_activations).post(create_activation),
        )
        .route("/api/v1/activations/{id}/revoke", post(revoke_activation))
        .route("/api/v1/audit", get(audit_log))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        // Authenticated by the activation code, not the operator token.
        .route("/api/v1/enroll", post(enroll))
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
    audit_op(
        &s,
        "agent.credentials",
        &id,
        "ok",
        "broker credential minted",
    );
    Ok(Json(Credentials {
        username: id,
        password,
    }))
}

/// The answer to a deregistration.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deregistered {
    /// The agent.
    pub id: String,
    /// Whether the embedded broker enforces it: false with an external broker, whose
    /// password and ACL files must be written again (`drover broker acl`).
    pub embedded_broker: bool,
    /// Whether a live connection to the embedded broker was closed.
    pub disconnected: bool,
}

async fn deregister_agent(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Deregistered>, ApiError> {
    // The credential first, so the agent cannot log in again once dropped.
    if !s
        .control
        .store()
        .deregister_agent(&id, drover_protocol::now_ms())?
    {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no agent {id:?}")));
    }
    let disconnected = match &s.broker {
        Some(broker) => broker.revoke_agent(&id).await,
        None => false,
    };
    tracing::info!(agent.id = %id, disconnected, "agent deregistered");
    // Its open targets will never be served: settled now, freeing their slots.
    s.control.agent_deregistered(&id).await?;
    Ok(Json(Deregistered {
        id,
        embedded_broker: s.broker.is_some(),
        disconnected,
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
    // Every distinct signer's signature must hold; which signers to trust, and how many
    // are needed, is each agent's decision.
    let mut signers: Vec<_> = req.manifest.signatures.iter().map(|s| s.key).collect();
    signers.sort();
    signers.dedup();
    let m = req
        .manifest
        .verify_threshold(&signers, signers.len())
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
    audit_op(
        &s,
        "plugin.publish",
        &format!("{} v{}", m.name, m.version),
        "ok",
        &format!("sha256 {}", m.sha256),
    );
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
    let what = format!("{} on {}", req.plugin, req.targets);
    let created = match s.control.submit(req).await {
        Ok(c) => c,
        Err(e) => {
            audit_op(&s, "job.create", &what, "refused", &e.to_string());
            return Err(e.into());
        }
    };
    audit_op(
        &s,
        "job.create",
        &created.job_id,
        "ok",
        &format!("{what}: {} agent(s)", created.agents.len()),
    );
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn create_command(
    State(s): State<ApiState>,
    Json(req): Json<crate::command::CommandRequest>,
) -> Result<Response, ApiError> {
    let what = match &req.script {
        Some(script) => format!("script {script:?} on {}", req.targets),
        None => format!("{:?} on {}", req.argv, req.targets),
    };
    let job = match req.into_job() {
        Ok(j) => j,
        Err(e) => {
            audit_op(&s, "command.create", &what, "refused", &e);
            return Err(bad(e));
        }
    };
    let created = match s.control.submit(job).await {
        Ok(c) => c,
        Err(e) => {
            audit_op(&s, "command.create", &what, "refused", &e.to_string());
            return Err(e.into());
        }
    };
    audit_op(
        &s,
        "command.create",
        &created.job_id,
        "ok",
        &format!("{what}: {} agent(s)", created.agents.len()),
    );
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn cancel_job(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<crate::control::CancelOutcome>, ApiError> {
    let outcome = s.control.cancel(&id).await?;
    audit_op(
        &s,
        "job.cancel",
        &id,
        "ok",
        &format!(
            "{} not started, {} asked to stop",
            outcome.not_started, outcome.stop_requests
        ),
    );
    Ok(Json(outcome))
}

/// Job listing parameters.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// At most this many (default 20).
    pub limit: Option<u32>,
}

/// A job in a listing: the job and its state counts.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job.
    pub job: JobRow,
    /// Targets per state.
    pub counts: std::collections::BTreeMap<String, usize>,
    /// Whether it is rate-controlled.
    pub rate_controlled: bool,
}

async fn list_jobs(
    State(s): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<JobSummary>>, ApiError> {
    let store = s.control.store();
    let mut out = Vec::new();
    for job in store.jobs(q.limit.unwrap_or(20).min(1000))? {
        out.push(JobSummary {
            counts: store.state_counts(&job.id)?,
            rate_controlled: store.rollout(&job.id)?.is_some(),
            job,
        });
    }
    Ok(Json(out))
}

/// Streams a job's live events as JSON lines: first every target's state, then output
/// and state changes as they happen, and an `end` event once every target is final.
async fn live_job(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    use crate::control::{LiveEvent, LiveWhat};
    use tokio::sync::broadcast::error::RecvError;
    // Subscribed before the snapshot, so nothing falls between the two.
    let mut live = s.control.live();
    let store = s.control.store().clone();
    if store.job(&id)?.is_none() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    let first = store.target_states(&id)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(256);
    let line = |e: &LiveEvent| {
        let mut v = serde_json::to_vec(e).unwrap_or_default();
        v.push(b'\n');
        axum::body::Bytes::from(v)
    };
    tokio::spawn(async move {
        let ev = |agent: &str, what: LiveWhat| LiveEvent {
            job_id: id.clone(),
            agent_id: agent.to_string(),
            what,
        };
        let mut open: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (agent, state, detail, done) in first {
            if !done {
                open.insert(agent.clone());
            }
            let e = ev(&agent, LiveWhat::State { state, detail });
            if tx.send(line(&e)).await.is_err() {
                return;
            }
        }
        let recheck = |open: &mut std::collections::HashSet<String>| {
            if let Ok(targets) = store.target_states(&id) {
                for (agent, _, _, done) in targets {
                    if done {
                        open.remove(&agent);
                    }
                }
            }
        };
        // A fixed beat, whatever other jobs' events do: it rechecks the store and tells
        // the follower the stream is alive, so it can keep its own deadline.
        let mut beat = tokio::time::interval(Duration::from_secs(2));
        beat.tick().await;
        while !open.is_empty() {
            let got = tokio::select! {
                _ = tx.closed() => return,
                _ = beat.tick() => {
                    recheck(&mut open);
                    if tx.send(line(&ev("", LiveWhat::Keepalive))).await.is_err() {
                        return;
                    }
                    continue;
                }
                got = live.recv() => got,
            };
            match got {
                Ok(e) if e.job_id == id => {
                    if let LiveWhat::State { state, .. } = &e.what
                        && state.is_final()
                    {
                        open.remove(&e.agent_id);
                    }
                    if tx.send(line(&e)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    let e = ev("", LiveWhat::Lagged { skipped });
                    if tx.send(line(&e)).await.is_err() {
                        return;
                    }
                    recheck(&mut open);
                }
                Err(RecvError::Closed) => return,
            }
        }
        let _ = tx.send(line(&ev("", LiveWhat::End))).await;
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
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
    /// List only the targets updated at or after this time (the server's clock, as in
    /// `updated_ms`); `counts` still covers every target. A follower passes the largest
    /// `updated_ms` it has seen, so each result travels about once.
    #[serde(default)]
    pub since_ms: Option<u64>,
}

pub use crate::command::JobView;

fn job_view(s: &ApiState, id: &str, since_ms: Option<u64>) -> Result<JobView, ApiError> {
    let store = s.control.store();
    let job = store
        .job(id)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    Ok(match since_ms {
        None => JobView::new(job, store.rollout(id)?, store.targets(id)?),
        Some(since) => JobView {
            job,
            counts: store.state_counts(id)?,
            rollout: store.rollout(id)?,
            targets: store.targets_since(id, since)?,
        },
    })
}

async fn get_job(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Json<JobView>, ApiError> {
    let mut changed = s.control.results_changed();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.unwrap_or(0).min(60_000));
    let store = s.control.store();
    if store.job(&id)?.is_none() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    loop {
        // Counting is cheap; the full view (with every output) is built once, at the end.
        let (total, done) = store.progress_of(&id)?;
        if done == total
            || done > q.done.unwrap_or(usize::MAX)
            || tokio::time::Instant::now() >= deadline
        {
            return Ok(Json(job_view(&s, &id, q.since_ms)?));
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            continue;
        }
        // Results come in bursts: one count for each burst, not one for each result
        // (a count reads every target of the job).
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + WAIT_COALESCE)).await;
    }
}

/// How long a waiting job view lets results gather before counting again.
const WAIT_COALESCE: Duration = Duration::from_millis(20);

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

async fn get_keyset(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(s.control.keyset()).into_response())
}

async fn put_keyset(
    State(s): State<ApiState>,
    Json(next): Json<drover_protocol::signed::Signed<drover_protocol::keyset::KeySet>>,
) -> Result<Response, ApiError> {
    let current = s
        .control
        .keyset()
        .unverified()
        .map_err(|e| internal(e.into()))?;
    let ks = current
        .verify_successor(&next)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    crate::trust::store(&s.data, &next)?;
    let sent = s.control.set_keyset(next).await?;
    tracing::info!(version = ks.version, agents = sent, "key set rotated");
    audit_op(
        &s,
        "keyset.rotate",
        &format!("v{}", ks.version),
        "ok",
        &format!("sent to {sent} agent(s)"),
    );
    Ok(Json(serde_json::json!({ "version": ks.version, "sent_to": sent })).into_response())
}

/// Records an operator action in the audit log; a failure to record is logged, not fatal
/// to the action that already happened.
fn audit_op(s: &ApiState, action: &str, target: &str, outcome: &str, detail: &str) {
    if let Err(e) = s.control.store().audit(
        "operator",
        action,
        target,
        outcome,
        detail,
        drover_protocol::now_ms(),
    ) {
        tracing::error!(error = %format!("{e:#}"), action, "could not write the audit log");
    }
}

/// A request for an activation.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActivationRequest {
    /// Lifetime, seconds.
    pub expires_secs: u64,
    /// How many agents may enroll with it.
    pub max_uses: u32,
    /// Tags enrolled agents get.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// Bind it to one agent id.
    #[serde(default)]
    pub agent_id: Option<String>,
}

async fn create_activation(
    State(s): State<ApiState>,
    Json(req): Json<ActivationRequest>,
) -> Result<Response, ApiError> {
    let now = drover_protocol::now_ms();
    let created = crate::enrollment::create_activation(
        s.control.store(),
        now + req.expires_secs.saturating_mul(1000),
        req.max_uses,
        req.tags,
        req.agent_id,
        now,
    )
    .map_err(|e| bad(format!("{e:#}")))?;
    audit_op(
        &s,
        "activation.create",
        &created.activation.id,
        "ok",
        &format!(
            "max uses {}, expires in {} s",
            created.activation.max_uses, req.expires_secs
        ),
    );
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_activations(State(s): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(s.control.store().activations()?).into_response())
}

async fn revoke_activation(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !s
        .control
        .store()
        .revoke_activation(&id, drover_protocol::now_ms())?
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no active activation {id}"),
        ));
    }
    audit_op(&s, "activation.revoke", &id, "ok", "");
    Ok(Json(serde_json::json!({ "revoked": id })).into_response())
}

async fn enroll(
    State(s): State<ApiState>,
    Json(req): Json<drover_protocol::enroll::EnrollRequest>,
) -> Result<Response, ApiError> {
    use crate::enrollment::EnrollError;
    let store = s.control.store();
    let now = drover_protocol::now_ms();
    let r = crate::enrollment::enroll(store, &s.control.keyset(), &s.broker_url, &req, now);
    let actor = format!("enroll:{}", req.activation_id);
    let target = r
        .as_ref()
        .map(|e| e.agent_id.clone())
        .unwrap_or_else(|_| req.agent_id.clone().unwrap_or_default());
    let outcome = if r.is_ok() { "ok" } else { "refused" };
    let detail = match &r {
        Ok(_) => format!("signing key {}", req.signing_key.short()),
        Err(e) => e.to_string(),
    };
    if let Err(e) = store.audit(&actor, "agent.enroll", &target, outcome, &detail, now) {
        tracing::error!(error = %format!("{e:#}"), "could not write the audit log");
    }
    match r {
        Ok(resp) => {
            tracing::info!(agent.id = %resp.agent_id, activation = %req.activation_id, "agent enrolled");
            Ok(Json(resp).into_response())
        }
        Err(e) => {
            tracing::warn!(activation = %req.activation_id, error = %e, "enrollment refused");
            let code = match e {
                EnrollError::BadCode => StatusCode::UNAUTHORIZED,
                EnrollError::Unusable(_) => StatusCode::FORBIDDEN,
                EnrollError::BadRequest(_) => StatusCode::BAD_REQUEST,
                EnrollError::Conflict(_) => StatusCode::CONFLICT,
                EnrollError::Internal(e) => return Err(internal(e)),
            };
            Err(ApiError(code, e.to_string()))
        }
    }
}

async fn audit_log(
    State(s): State<ApiState>,
    Query(f): Query<crate::store::AuditFilter>,
) -> Result<Response, ApiError> {
    Ok(Json(s.control.store().audit_log(&f)?).into_response())
}
