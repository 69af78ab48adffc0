//! The engine's routes: submit, list, show (with a long-poll), follow live, cancel.

use std::collections::HashSet;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::submit::SubmitError;
use super::types::{
    CancelOutcome, JobCreated, JobQuery, JobRequest, JobSummary, JobView, ListQuery, LiveEvent,
    LiveWhat, counts,
};
use super::{Jobs, store};
use crate::api::error::{ApiError, ErrorBody, ErrorCode, Json, Query};
use crate::audit::Audit;
use crate::fleet::targets::TargetError;

/// How long a waiting job view lets results gather before counting again, per target
/// of the job, and at most: a count reads every target, so a large job is counted once
/// per burst of results, and a small one at once.
const WAIT_COALESCE_PER_TARGET: Duration = Duration::from_micros(20);
const WAIT_COALESCE_MAX: Duration = Duration::from_millis(20);
/// How often a live stream says it is alive, and checks the store.
const LIVE_BEAT: Duration = Duration::from_secs(2);

/// What the routes work with.
#[derive(Clone, Debug)]
struct JobsApi {
    jobs: Jobs,
    audit: Audit,
}

/// The engine's routes.
pub fn routes(jobs: Jobs) -> OpenApiRouter {
    let audit = jobs.shared.audit.clone();
    OpenApiRouter::new()
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(live_job))
        .with_state(JobsApi { jobs, audit })
}

/// A refused submission, as the API says it.
pub fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::BadRequest(m) => ApiError::bad(m),
        SubmitError::NoSuchPlugin(m) => ApiError::new(ErrorCode::NoSuchPlugin, m),
        SubmitError::Targets(t) => {
            let code = match &t {
                TargetError::BadSelector(_) => ErrorCode::BadRequest,
                TargetError::Unknown(_) => ErrorCode::NoSuchAgent,
                TargetError::Deregistered(_) => ErrorCode::AgentDeregistered,
                TargetError::NoMatch(_) => ErrorCode::NoTargets,
            };
            ApiError::new(code, t.to_string())
        }
        SubmitError::Internal(e) => ApiError::internal(e),
    }
}

fn no_job(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NoSuchJob, format!("no job {id}"))
}

/// Runs a plugin on agents: each target gets a signed envelope, at once or as the rate
/// control allows.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs",
    request_body = JobRequest,
    responses(
        (status = 201, description = "Created", body = JobCreated),
        (status = 400, description = "The request is wrong", body = ErrorBody),
        (status = 404, description = "No such plugin, or no agents match", body = ErrorBody),
    ))]
async fn create_job(
    State(s): State<JobsApi>,
    Json(req): Json<JobRequest>,
) -> Result<(StatusCode, Json<JobCreated>), ApiError> {
    let what = format!("{} on {}", req.plugin, req.targets);
    audited(&s.audit, "job.create", &what, s.jobs.submit(req).await).await
}

/// Records a submission in the audit log, as `action` on the new job or, refused, on
/// `what` was asked; and answers it.
pub async fn audited(
    audit: &Audit,
    action: &str,
    what: &str,
    submitted: Result<JobCreated, SubmitError>,
) -> Result<(StatusCode, Json<JobCreated>), ApiError> {
    match submitted {
        Ok(created) => {
            let detail = format!("{what}: {} agent(s)", created.agents.len());
            audit
                .record("operator", action, &created.job_id, "ok", &detail)
                .await;
            Ok((StatusCode::CREATED, Json(created)))
        }
        Err(e) => {
            audit
                .record("operator", action, what, "refused", &e.to_string())
                .await;
            Err(submit_error(e))
        }
    }
}

/// Lists recent jobs, newest first, with their state counts.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    params(ListQuery),
    responses((status = 200, description = "Recent jobs", body = Vec<JobSummary>)))]
async fn list_jobs(
    State(s): State<JobsApi>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<JobSummary>>, ApiError> {
    Ok(Json(s.jobs.list(q.limit.unwrap_or(20).min(1000)).await?))
}

/// A job with its targets. With `wait_ms`, waits until more targets than `done` are
/// done (or all are); with `since_ms`, lists only the targets changed since.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id"), JobQuery),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
async fn get_job(
    State(s): State<JobsApi>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Json<JobView>, ApiError> {
    let jobs = &s.jobs;
    let mut changed = jobs.results_changed();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.unwrap_or(0).min(60_000));
    if store::job(jobs.db(), &id).await?.is_none() {
        return Err(no_job(&id));
    }
    loop {
        // Counting is cheap; the full view (with every output) is built once, at the end.
        let (total, done) = store::progress_of(jobs.db(), &id).await?;
        if done == total
            || done > q.done.unwrap_or(usize::MAX)
            || tokio::time::Instant::now() >= deadline
        {
            return jobs
                .view(&id, q.since_ms)
                .await?
                .map(Json)
                .ok_or_else(|| no_job(&id));
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            continue;
        }
        // Results come in bursts: one count for each burst, not one for each result
        // (a count reads every target of the job). A job of one target waits 20 µs.
        let coalesce = (WAIT_COALESCE_PER_TARGET * total as u32).min(WAIT_COALESCE_MAX);
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + coalesce)).await;
    }
}

/// Cancels a job: targets not sent yet never will be, running ones are stopped.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Cancelled", body = CancelOutcome),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
async fn cancel_job(
    State(s): State<JobsApi>,
    Path(id): Path<String>,
) -> Result<Json<CancelOutcome>, ApiError> {
    let outcome = s.jobs.cancel(&id).await?.ok_or_else(|| no_job(&id))?;
    let detail = format!(
        "{} not started, {} asked to stop",
        outcome.not_started, outcome.stop_requests
    );
    s.audit
        .record("operator", "job.cancel", &id, "ok", &detail)
        .await;
    Ok(Json(outcome))
}

/// Follows a job as JSON lines (`application/x-ndjson`, one `LiveEvent` per line): first
/// every target's state, then output and state changes as they happen, a keepalive
/// every 2 s, and an `end` event once every target is final.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/live", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "One LiveEvent per line", body = LiveEvent, content_type = "application/x-ndjson"),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
async fn live_job(State(s): State<JobsApi>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let jobs = s.jobs;
    // Subscribed before the snapshot, so nothing falls between the two.
    let mut live = jobs.live();
    if store::job(jobs.db(), &id).await?.is_none() {
        return Err(no_job(&id));
    }
    let first = store::target_states(jobs.db(), &id).await?;
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
        let mut open: HashSet<String> = HashSet::new();
        for (agent, state, detail, done) in first {
            if !done {
                open.insert(agent.clone());
            }
            let e = ev(&agent, LiveWhat::State { state, detail });
            if tx.send(line(&e)).await.is_err() {
                return;
            }
        }
        let recheck = |open: &mut HashSet<String>| {
            let (jobs, id) = (jobs.clone(), id.clone());
            let mut open = std::mem::take(open);
            async move {
                if let Ok(targets) = store::target_states(jobs.db(), &id).await {
                    for (agent, _, _, done) in targets {
                        if done {
                            open.remove(&agent);
                        }
                    }
                }
                open
            }
        };
        // A fixed beat, whatever other jobs' events do: it rechecks the store and tells
        // the follower the stream is alive, so it can keep its own deadline.
        let mut beat = tokio::time::interval(LIVE_BEAT);
        beat.tick().await;
        while !open.is_empty() {
            let got = tokio::select! {
                _ = tx.closed() => return,
                _ = beat.tick() => {
                    open = recheck(&mut open).await;
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
                    open = recheck(&mut open).await;
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

impl Jobs {
    /// A job with its targets (only those updated since `since_ms`, if given; the counts
    /// cover all), and its rollout if rate-controlled.
    pub async fn view(&self, id: &str, since_ms: Option<u64>) -> anyhow::Result<Option<JobView>> {
        let Some(job) = store::job(self.db(), id).await? else {
            return Ok(None);
        };
        let rollout = store::rollout(self.db(), id)
            .await?
            .filter(|r| r.spec.rate_controlled);
        let targets = store::targets(self.db(), id, since_ms.unwrap_or(0)).await?;
        let counts = match since_ms {
            None => counts(&targets),
            Some(_) => store::state_counts(self.db(), id).await?,
        };
        Ok(Some(JobView {
            job,
            counts,
            rollout,
            targets,
        }))
    }

    /// Recent jobs, newest first, with their state counts.
    pub async fn list(&self, limit: u32) -> anyhow::Result<Vec<JobSummary>> {
        self.summaries(None, limit).await
    }

    /// Recent jobs of plugins implementing `world`, newest first, with their state
    /// counts.
    pub async fn list_of_world(
        &self,
        world: drover_protocol::manifest::World,
        limit: u32,
    ) -> anyhow::Result<Vec<JobSummary>> {
        self.summaries(Some(world.as_str()), limit).await
    }

    async fn summaries(&self, world: Option<&str>, limit: u32) -> anyhow::Result<Vec<JobSummary>> {
        let mut out = Vec::new();
        for job in store::jobs(self.db(), world, limit).await? {
            out.push(JobSummary {
                counts: store::state_counts(self.db(), &job.id).await?,
                rate_controlled: store::rollout(self.db(), &job.id)
                    .await?
                    .is_some_and(|r| r.spec.rate_controlled),
                job,
            });
        }
        Ok(out)
    }
}
