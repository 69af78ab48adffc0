//! The fleet's routes: agents, their credentials and events, the key set they trust,
//! activations, and enrollment.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use drover_protocol::enroll::{EnrollRequest, EnrollResponse};
use drover_protocol::keyset::KeySet;
use drover_protocol::openapi::SignedDoc;
use drover_protocol::signed::Signed;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Fleet;
use super::enrollment::EnrollError;
use super::types::{
    Activation, ActivationCreated, ActivationRequest, Agent, AgentEvent, AgentEventQuery,
    Credentials, Deregistered, KeysetRotated, Revoked, TagChange,
};
use crate::api::error::{ApiError, ErrorBody, ErrorCode, Json, Query};
use crate::trust::AdoptError;

/// The routes that need the operator token.
pub fn routes(fleet: Fleet) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(create_credentials))
        .routes(routes!(deregister_agent))
        .routes(routes!(tag_agent))
        .routes(routes!(list_agent_events))
        .routes(routes!(get_keyset, rotate_keyset))
        .routes(routes!(list_activations, create_activation))
        .routes(routes!(revoke_activation))
        .with_state(fleet)
}

/// The routes agents call without the operator token: enrollment, authenticated by the
/// activation code.
pub fn public_routes(fleet: Fleet) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(enroll))
        .with_state(fleet)
}

/// Lists every agent, with its status and when it was last seen.
#[utoipa::path(get, path = "/api/v1/agents", tag = "fleet",
    responses((status = 200, description = "All agents, by id", body = Vec<Agent>)))]
async fn list_agents(State(fleet): State<Fleet>) -> Result<Json<Vec<Agent>>, ApiError> {
    Ok(Json(fleet.agents().await?))
}

/// Mints (or replaces) an agent's broker credential. The password is shown once.
#[utoipa::path(post, path = "/api/v1/agents/{id}/credentials", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The new credential", body = Credentials),
        (status = 400, description = "The id is invalid or reserved", body = ErrorBody),
    ))]
async fn create_credentials(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
) -> Result<Json<Credentials>, ApiError> {
    let creds = fleet
        .create_credentials(&id)
        .await
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    fleet
        .audit()
        .record(
            "operator",
            "agent.credentials",
            &id,
            "ok",
            "broker credential minted",
        )
        .await;
    Ok(Json(creds))
}

/// Deregisters an agent: its broker credential is deleted, the embedded broker drops
/// its connection, and its targets that are not final become undeliverable.
#[utoipa::path(post, path = "/api/v1/agents/{id}/deregister", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "Deregistered", body = Deregistered),
        (status = 404, description = "No such agent", body = ErrorBody),
    ))]
async fn deregister_agent(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
) -> Result<Json<Deregistered>, ApiError> {
    let Some(d) = fleet.deregister(&id).await? else {
        return Err(ApiError::new(
            ErrorCode::NoSuchAgent,
            format!("no agent {id:?}"),
        ));
    };
    fleet
        .audit()
        .record(
            "operator",
            "agent.deregister",
            &id,
            "ok",
            if d.disconnected {
                "credential deleted, connection closed"
            } else {
                "credential deleted"
            },
        )
        .await;
    Ok(Json(d))
}

/// Changes an agent's tags, which jobs target by: removes `remove`, then sets `set`.
/// What the agent says of itself (its labels) never changes them.
#[utoipa::path(post, path = "/api/v1/agents/{id}/tags", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    request_body = TagChange,
    responses(
        (status = 200, description = "The agent with its new tags", body = Agent),
        (status = 400, description = "A tag is invalid", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
    ))]
async fn tag_agent(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Json(change): Json<TagChange>,
) -> Result<Json<Agent>, ApiError> {
    change.check().map_err(ApiError::bad)?;
    let agent = fleet
        .retag(&id, &change)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NoSuchAgent, format!("no agent {id:?}")))?;
    let mut detail: Vec<String> = change.remove.iter().map(|k| format!("-{k}")).collect();
    detail.extend(change.set.iter().map(|(k, v)| format!("{k}={v}")));
    fleet
        .audit()
        .record("operator", "agent.tag", &id, "ok", &detail.join(" "))
        .await;
    Ok(Json(agent))
}

/// What agents reported outside any job: refusals, forgeries, unmatched results.
#[utoipa::path(get, path = "/api/v1/events", tag = "fleet",
    params(AgentEventQuery),
    responses((status = 200, description = "Agent events, newest last", body = Vec<AgentEvent>)))]
async fn list_agent_events(
    State(fleet): State<Fleet>,
    Query(q): Query<AgentEventQuery>,
) -> Result<Json<Vec<AgentEvent>>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(Json(fleet.agent_events(q.agent.as_deref(), limit).await?))
}

/// The key set agents should hold.
#[utoipa::path(get, path = "/api/v1/keyset", tag = "fleet",
    responses((status = 200, description = "The signed key set", body = SignedDoc)))]
async fn get_keyset(State(fleet): State<Fleet>) -> Json<Signed<KeySet>> {
    Json(fleet.trust().keyset())
}

/// Adopts the next key set (a higher version, signed by enough current roots) and
/// sends it to every agent.
#[utoipa::path(post, path = "/api/v1/keyset", tag = "fleet",
    request_body(content = SignedDoc, description = "The next signed key set"),
    responses(
        (status = 200, description = "Adopted and sent", body = KeysetRotated),
        (status = 400, description = "Agents would refuse it", body = ErrorBody),
    ))]
async fn rotate_keyset(
    State(fleet): State<Fleet>,
    Json(next): Json<Signed<KeySet>>,
) -> Result<Json<KeysetRotated>, ApiError> {
    let r = fleet.rotate_keyset(next).await.map_err(|e| match e {
        AdoptError::Refused(m) => ApiError::new(ErrorCode::KeysetRefused, m),
        AdoptError::Internal(e) => ApiError::internal(e),
    })?;
    fleet
        .audit()
        .record(
            "operator",
            "keyset.rotate",
            &format!("v{}", r.version),
            "ok",
            &format!("sent to {} agent(s)", r.sent_to),
        )
        .await;
    Ok(Json(r))
}

/// Lists activations, newest first.
#[utoipa::path(get, path = "/api/v1/activations", tag = "fleet",
    responses((status = 200, description = "All activations", body = Vec<Activation>)))]
async fn list_activations(State(fleet): State<Fleet>) -> Result<Json<Vec<Activation>>, ApiError> {
    Ok(Json(fleet.activations().await?))
}

/// Mints an activation code agents enroll with. The code is shown once.
#[utoipa::path(post, path = "/api/v1/activations", tag = "fleet",
    request_body = ActivationRequest,
    responses(
        (status = 201, description = "Created", body = ActivationCreated),
        (status = 400, description = "Invalid", body = ErrorBody),
    ))]
async fn create_activation(
    State(fleet): State<Fleet>,
    Json(req): Json<ActivationRequest>,
) -> Result<(StatusCode, Json<ActivationCreated>), ApiError> {
    let secs = req.expires_secs;
    let created = fleet
        .create_activation(req)
        .await
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    fleet
        .audit()
        .record(
            "operator",
            "activation.create",
            &created.activation.id,
            "ok",
            &format!(
                "max uses {}, expires in {secs} s",
                created.activation.max_uses
            ),
        )
        .await;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Revokes an activation: no more enrollments with it.
#[utoipa::path(post, path = "/api/v1/activations/{id}/revoke", tag = "fleet",
    params(("id" = String, Path, description = "The activation's id")),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 404, description = "No active activation by that id", body = ErrorBody),
    ))]
async fn revoke_activation(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    if !fleet.revoke_activation(&id).await? {
        return Err(ApiError::new(
            ErrorCode::NoSuchActivation,
            format!("no active activation {id}"),
        ));
    }
    fleet
        .audit()
        .record("operator", "activation.revoke", &id, "ok", "")
        .await;
    Ok(Json(Revoked { revoked: id }))
}

/// Enrolls an agent: it presents an activation code and the public keys it made, and
/// gets its broker credential and the trust roots. Authenticated by the code, not the
/// operator token.
#[utoipa::path(post, path = "/api/v1/enroll", tag = "fleet",
    request_body = EnrollRequest,
    security(()),
    responses(
        (status = 200, description = "Enrolled", body = EnrollResponse),
        (status = 400, description = "The request is wrong", body = ErrorBody),
        (status = 401, description = "Unknown activation or wrong code", body = ErrorBody),
        (status = 403, description = "Revoked, expired or used up", body = ErrorBody),
        (status = 409, description = "The agent id is taken or deregistered", body = ErrorBody),
    ))]
async fn enroll(
    State(fleet): State<Fleet>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let r = fleet.enroll(&req).await;
    let actor = format!("enroll:{}", req.activation_id);
    let target = r
        .as_ref()
        .map(|e| e.agent_id.clone())
        .unwrap_or_else(|_| req.agent_id.clone().unwrap_or_default());
    let (outcome, detail) = match &r {
        Ok(_) => ("ok", format!("signing key {}", req.signing_key.short())),
        Err(e) => ("refused", e.to_string()),
    };
    fleet
        .audit()
        .record(&actor, "agent.enroll", &target, outcome, &detail)
        .await;
    match r {
        Ok(resp) => {
            tracing::info!(agent.id = %resp.agent_id, activation = %req.activation_id, "agent enrolled");
            Ok(Json(resp))
        }
        Err(e) => {
            tracing::warn!(activation = %req.activation_id, error = %e, "enrollment refused");
            let code = match e {
                EnrollError::BadCode => ErrorCode::BadActivationCode,
                EnrollError::Unusable(_) => ErrorCode::ActivationUnusable,
                EnrollError::BadRequest(_) => ErrorCode::BadRequest,
                EnrollError::Conflict(_) => ErrorCode::Conflict,
                EnrollError::Internal(e) => return Err(ApiError::internal(e)),
            };
            Err(ApiError::new(code, e.to_string()))
        }
    }
}
