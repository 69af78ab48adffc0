//! How the API says no: one [`ApiError`], a status and a stable, machine-readable
//! [`ErrorCode`] with a sentence for people.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a request failed. The names are stable: programs branch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed, or contradicts itself.
    BadRequest,
    /// The operator token is missing or wrong.
    Unauthorized,
    /// What the path names does not exist.
    NotFound,
    /// No job has that id.
    NoSuchJob,
    /// No plugin (or version of it) has that name.
    NoSuchPlugin,
    /// No agent has that id.
    NoSuchAgent,
    /// No activation has that id, or it is no longer active.
    NoSuchActivation,
    /// The targets match no agent.
    NoTargets,
    /// A target names an agent that was deregistered.
    AgentDeregistered,
    /// The request conflicts with what is stored: a plugin version published already,
    /// an agent id enrolled already.
    Conflict,
    /// An enrollment's activation id or code is wrong.
    BadActivationCode,
    /// An activation exists but cannot be used: expired, revoked, or used up.
    ActivationUnusable,
    /// A key set offered as the next one is not signed by enough current roots, or is
    /// not newer.
    KeysetRefused,
    /// The request was not answered in time (its body came too slowly, say).
    RequestTimeout,
    /// The server failed; the message says where.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest | ErrorCode::KeysetRefused => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized | ErrorCode::BadActivationCode => StatusCode::UNAUTHORIZED,
            ErrorCode::ActivationUnusable => StatusCode::FORBIDDEN,
            ErrorCode::NotFound
            | ErrorCode::NoSuchJob
            | ErrorCode::NoSuchPlugin
            | ErrorCode::NoSuchAgent
            | ErrorCode::NoSuchActivation
            | ErrorCode::NoTargets
            | ErrorCode::AgentDeregistered => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs.
    pub code: ErrorCode,
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    /// For programs.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// A malformed request.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    /// The server failed: logged here, with the chain of causes.
    pub fn internal(e: anyhow::Error) -> ApiError {
        tracing::error!(error = %format!("{e:#}"), "API request failed");
        ApiError::new(ErrorCode::Internal, format!("{e:#}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            code: self.code,
        };
        (self.code.status(), axum::Json(body)).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(e)
    }
}

/// A JSON body, refused as an [`ApiError`] when it does not parse.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(e) => Err(json_rejection(e)),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(e: JsonRejection) -> ApiError {
    ApiError::bad(format!(
        "the request body is not what this endpoint takes: {}",
        e.body_text()
    ))
}

/// A query string, refused as an [`ApiError`] when it does not parse.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(query_rejection(e)),
        }
    }
}

fn query_rejection(e: QueryRejection) -> ApiError {
    ApiError::bad(format!(
        "the query string is not what this endpoint takes: {}",
        e.body_text()
    ))
}
