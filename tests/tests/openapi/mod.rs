//! The API's OpenAPI document, served by a real server: complete (every route the CLI and
//! agents call is in it, and every operation in it is a route that answers), closed
//! (every schema it refers to is in it), and true about errors (every refusal is an
//! `ErrorBody` with a documented code).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use super::support::*;

/// What the CLI and agents call: the document must have each of these.
const CALLED: &[(&str, &str)] = &[
    ("get", "/api/v1/agents"),
    ("post", "/api/v1/agents/{id}/credentials"),
    ("post", "/api/v1/agents/{id}/deregister"),
    ("post", "/api/v1/agents/{id}/tags"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/keyset"),
    ("post", "/api/v1/keyset"),
    ("get", "/api/v1/activations"),
    ("post", "/api/v1/activations"),
    ("post", "/api/v1/activations/{id}/revoke"),
    ("post", "/api/v1/enroll"),
    ("get", "/api/v1/plugins"),
    ("post", "/api/v1/plugins"),
    ("get", "/api/v1/jobs"),
    ("post", "/api/v1/jobs"),
    ("get", "/api/v1/jobs/{id}"),
    ("post", "/api/v1/jobs/{id}/cancel"),
    ("get", "/api/v1/jobs/{id}/live"),
    ("get", "/api/v1/commands"),
    ("post", "/api/v1/commands"),
    ("get", "/api/v1/commands/{id}"),
    ("get", "/api/v1/audit"),
];

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .new_agent()
}

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref"
                    && let Some(s) = x.as_str()
                {
                    out.insert(s.to_string());
                }
                refs(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_openapi_document_covers_every_route_and_every_error_is_typed() {
    let server = Server::start();
    let base = server.info()["api"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(server.data.join("api-token"))
        .unwrap()
        .trim()
        .to_string();
    let http = agent();

    // Served without the operator token.
    let mut resp = http
        .get(format!("{base}/api/v1/openapi.json"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let doc: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );

    // Complete: what the CLI and agents call is documented, and nothing else is.
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                documented.insert((method.to_string(), path.clone()));
            }
        }
    }
    let called: BTreeSet<(String, String)> = CALLED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, called);

    // Closed: every schema referred to is defined.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut all = BTreeSet::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(schemas.contains_key(name), "{r} is not defined");
    }
    let codes: Vec<String> = schemas["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert!(codes.contains(&"no_such_job".to_string()), "{codes:?}");

    // Described: each operation says what it does, what it answers and, if it takes a
    // body, what body.
    for (method, path) in &documented {
        let op = &paths[path][method];
        let what = format!("{} {path}", method.to_uppercase());
        assert!(op["operationId"].is_string(), "{what}: no operationId");
        assert!(
            op["summary"].is_string() || op["description"].is_string(),
            "{what}: undescribed"
        );
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success response"
        );
        for (status, r) in responses {
            assert!(
                r["content"].as_object().is_some_and(|c| !c.is_empty()),
                "{what} {status}: no body schema"
            );
        }
        if method == "post" && !path.ends_with("/cancel") && !path.ends_with("/revoke") {
            let needs_body = !path.ends_with("/credentials") && !path.ends_with("/deregister");
            assert_eq!(
                op["requestBody"].is_object(),
                needs_body,
                "{what}: request body documented wrongly"
            );
        }
    }

    // Every documented operation is a route that answers, and every refusal is an
    // ErrorBody with a documented code. Path parameters name nothing that exists, and
    // bodies are empty objects, which no endpoint takes.
    for (method, path) in &documented {
        let url = format!("{base}{}", path.replace("{id}", "openapi-probe"));
        let auth = format!("Bearer {token}");
        let mut resp = match method.as_str() {
            "get" => http.get(&url).header("Authorization", &auth).call(),
            _ => http
                .post(&url)
                .header("Authorization", &auth)
                .send_json(serde_json::json!({})),
        }
        .unwrap_or_else(|e| panic!("{} {path}: {e}", method.to_uppercase()));
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        let what = format!("{} {path} -> {status} {body}", method.to_uppercase());
        assert_ne!(status, 405, "{what}: not routed");
        if status >= 400 {
            let e: Value =
                serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON"));
            let code = e["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no code"));
            assert!(codes.iter().any(|c| c == code), "{what}: undocumented code");
            assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
            assert!(
                paths[path][method.as_str()]["responses"]
                    .get(status.to_string())
                    .is_some(),
                "{what}: status not documented"
            );
        }
    }

    // Without the token: refused, typed.
    let mut resp = http.get(format!("{base}/api/v1/agents")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let e: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(e["code"], "unauthorized");
}
