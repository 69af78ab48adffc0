//! A small blocking client for the server's HTTP API: the routes `drover` itself uses,
//! spoken as JSON values so this crate does not depend on the server's crate.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Talks to a running `drover serve`.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// Responses can be large: the agent list of a 10,000-agent fleet, a job with 10,000
/// results.
const BODY_LIMIT: u64 = 1 << 30;

impl Api {
    /// A client for the API at `base` (`http://HOST:PORT`), with the operator token if
    /// there is one (every route but enrollment and `/healthz` needs it).
    pub fn new(base: &str, token: Option<String>) -> Api {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// A client whose operator token is read from `token_file` (the server's
    /// `DATA_DIR/api-token`).
    pub fn with_token_file(base: &str, token_file: &Path) -> anyhow::Result<Api> {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the operator token {}", token_file.display()))?;
        Ok(Api::new(base, Some(token.trim().to_string())))
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn finish(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Value> {
        let mut resp = r.with_context(|| format!("{what}: cannot reach {}", self.base))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .with_context(|| format!("{what}: reading the response"))?;
        if !status.is_success() {
            bail!("{what}: HTTP {}: {text}", status.as_u16());
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: not JSON: {text}"))
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.as_deref().unwrap_or(""))
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", self.bearer())
            .call();
        self.finish(&format!("GET {path}"), r)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", self.bearer())
            .send_json(body);
        self.finish(&format!("POST {path}"), r)
    }

    /// Every registered agent, as `drover agents list --output json` shows them.
    pub fn agents(&self) -> anyhow::Result<Vec<Value>> {
        match self.get("/api/v1/agents")? {
            Value::Array(a) => Ok(a),
            other => bail!("agent list is not an array: {other}"),
        }
    }

    /// How many agents whose id starts with `prefix` the server has online.
    pub fn online_count(&self, prefix: &str) -> anyhow::Result<usize> {
        Ok(self
            .agents()?
            .iter()
            .filter(|a| a["online"] == true)
            .filter(|a| a["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
            .count())
    }

    /// How many of `ids` the server has online.
    pub fn online_among(&self, ids: &[String]) -> anyhow::Result<usize> {
        let ids: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        Ok(self
            .agents()?
            .iter()
            .filter(|a| a["online"] == true)
            .filter(|a| a["id"].as_str().is_some_and(|id| ids.contains(id)))
            .count())
    }

    /// Polls until at least `n` agents whose id starts with `prefix` are online, calling
    /// `progress` with each count. Returns the last count and how long it took.
    pub fn wait_online(
        &self,
        prefix: &str,
        n: usize,
        timeout: Duration,
        mut progress: impl FnMut(usize),
    ) -> anyhow::Result<(usize, Duration)> {
        let t = Instant::now();
        loop {
            let online = self.online_count(prefix)?;
            progress(online);
            if online >= n {
                return Ok((online, t.elapsed()));
            }
            if t.elapsed() >= timeout {
                bail!(
                    "only {online} of {n} agents ({prefix}*) online after {:.0?}",
                    t.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(if n > 1000 { 1000 } else { 200 }));
        }
    }

    /// Mints an activation (as `drover activation create`); returns its id and code.
    pub fn create_activation(
        &self,
        max_uses: u32,
        tags: &BTreeMap<String, String>,
        expires: Duration,
    ) -> anyhow::Result<(String, String)> {
        let v = self.post(
            "/api/v1/activations",
            &json!({
                "expires_secs": expires.as_secs().max(1),
                "max_uses": max_uses,
                "tags": tags,
            }),
        )?;
        let id = v["activation"]["id"]
            .as_str()
            .context("activation without an id")?;
        let code = v["code"].as_str().context("activation without a code")?;
        Ok((id.to_string(), code.to_string()))
    }

    /// Submits a job (the body `drover run` sends); returns its id and target count.
    pub fn submit(&self, request: &Value) -> anyhow::Result<(String, usize)> {
        let v = self.post("/api/v1/jobs", request)?;
        let id = v["job_id"].as_str().context("job without an id")?;
        let n = v["agents"].as_array().map_or(0, Vec::len);
        Ok((id.to_string(), n))
    }

    /// The job and its targets, waiting up to `wait` for more than `done` results.
    pub fn job(&self, id: &str, done: usize, wait: Duration) -> anyhow::Result<Value> {
        self.get(&format!(
            "/api/v1/jobs/{id}?done={done}&wait_ms={}",
            wait.as_millis()
        ))
    }

    /// Long-polls the job until all `targets` have a result, or `timeout`; returns the
    /// last view (`{"job", "targets"}`). It asks the server to answer only when the last
    /// result is in, so a fan-out to N agents costs one response, not N.
    pub fn wait_job(&self, id: &str, targets: usize, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let view = self.job(
                id,
                targets.saturating_sub(1),
                left.min(Duration::from_secs(30)),
            )?;
            let (n, total) = results_in(&view);
            if n == total || Instant::now() >= deadline {
                return Ok(view);
            }
        }
    }
}

/// How many of a job view's targets have a result, and how many targets there are.
pub fn results_in(view: &Value) -> (usize, usize) {
    let targets = view["targets"].as_array().map_or(&[][..], Vec::as_slice);
    let done = targets.iter().filter(|t| !t["result"].is_null()).count();
    (done, targets.len())
}
