//! The HTTP API, on loopback by default: the capabilities' routes, composed. Every route
//! but `/healthz`, `/api/v1/openapi.json` and enrollment needs the operator token
//! (`Authorization: Bearer ...`), which the server writes to its data directory.
//!
//! Routes are registered together with their OpenAPI description (utoipa), so the
//! document served at `/api/v1/openapi.json` covers every route there is. Errors are one
//! [`error::ApiError`] with a stable code.

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

use error::{ApiError, ErrorBody, ErrorCode};

/// The largest request body: a plugin upload, base64.
const MAX_BODY: usize = 256 << 20;

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
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    (app, doc)
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
    next.run(req).await
}
