//! The HTTP API, on loopback by default: the capabilities' routes, composed. Every route
//! but `/healthz`, `/api/v1/openapi.json` and enrollment needs the operator token
//! (`Authorization: Bearer ...`), which the server writes to its data directory.
//!
//! Routes are registered together with their OpenAPI description (utoipa), so the
//! document served at `/api/v1/openapi.json` covers every route there is. Errors are one
//! [`error::ApiError`] with a stable code. [`listener`] serves it within a connection
//! budget and timeouts.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::capability::Capability;

pub mod error;
pub mod listener;

use error::{ApiError, ErrorBody, ErrorCode};

/// The largest request body: a plugin upload, base64.
const MAX_BODY: usize = 256 << 20;

/// How long a request may take to be answered (its response headers; a streamed body
/// may last longer). The longest wait a route offers is a minute (`wait_ms`).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// Where the document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Drover",
        description = "Manage fleets of machines with signed WebAssembly plugins over MQTT: agents, plugins, jobs, Run Command, the audit log.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody, ErrorCode)),
    security(("operator" = [])),
)]
struct ApiDoc;

/// The API's router and its OpenAPI document, from the capabilities' routes.
pub fn router(token: String, capabilities: &[&dyn Capability]) -> (Router, OpenApi) {
    let mut operator = OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi());
    let mut public = OpenApiRouter::new();
    for c in capabilities {
        operator = operator.merge(c.routes());
        if let Some(r) = c.public_routes() {
            public = public.merge(r);
        }
    }
    let (operator, mut doc) = operator.split_for_parts();
    let (public, public_doc) = public.split_for_parts();
    doc.merge(public_doc);
    let scheme = SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer));
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme("operator", scheme);
    let served = doc.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            OPENAPI_PATH,
            get(move || async move { axum::Json(served.clone()) }),
        )
        .merge(public)
        .merge(operator.layer(middleware::from_fn_with_state(token, require_token)))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(request_timeout));
    (app, doc)
}

/// Answers a request that is not answered in [`REQUEST_TIMEOUT`] (a body sent slowly,
/// say) with a timeout, which closes what it held.
async fn request_timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            ErrorCode::RequestTimeout,
            format!(
                "the request was not answered within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

async fn require_token(State(token): State<String>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            // Compared as digests: equal-length inputs, so the time says nothing of the token.
            ring::digest::digest(&ring::digest::SHA256, t.as_bytes()).as_ref()
                == ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref()
        });
    if !ok {
        return ApiError::new(ErrorCode::Unauthorized, "missing or wrong operator token")
            .into_response();
    }
    // An operator's small body is read whole first: a route that takes no body would
    // otherwise answer before the body's bytes arrived, and hyper closes a connection
    // whose request body it cannot drain, under a client about to reuse it.
    let small = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > 0 && n <= SMALL_BODY);
    if !small {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, SMALL_BODY).await {
        Ok(bytes) => next.run(Request::from_parts(parts, bytes.into())).await,
        Err(e) => ApiError::bad(format!("the request body could not be read: {e}")).into_response(),
    }
}

/// Operators' request bodies up to this size are read whole before they are routed.
const SMALL_BODY: usize = 64 << 10;
