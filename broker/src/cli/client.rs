//! The CLI's client for the HTTP API.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::paths::DataDir;

/// Talks to a running server.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// Finds the server through the data directory, unless `server` is given.
    pub fn connect(data: &DataDir, server: Option<&str>) -> anyhow::Result<Client> {
        let base = match server {
            Some(s) => s.trim_end_matches('/').to_string(),
            None => data.read_server_info()?.api,
        };
        let token = std::fs::read_to_string(data.api_token())
            .with_context(|| format!("reading the operator token {}", data.api_token().display()))?
            .trim()
            .to_string();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Ok(Client { base, token, agent })
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut resp =
            r.with_context(|| format!("{what}: cannot reach the server at {}", self.base))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(512 << 20)
            .read_to_string()
            .with_context(|| format!("{what}: reading the response"))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(text);
            bail!("{what}: {msg} (HTTP {})", status.as_u16());
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: unexpected response"))
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(what, r)
    }

    /// GET `path` as a stream of lines, calling `each` with every line until it returns
    /// `false` or the stream ends. There is no overall timeout: the stream lasts as long
    /// as what it follows.
    pub fn stream_lines(
        &self,
        what: &str,
        path: &str,
        mut each: impl FnMut(&str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let resp = agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .with_context(|| format!("{what}: cannot reach the server at {}", self.base))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.into_body().read_to_string().unwrap_or_default();
            bail!("{what}: {} (HTTP {status})", text.trim());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.with_context(|| format!("{what}: reading the stream"))?;
            if line.is_empty() {
                continue;
            }
            if !each(&line)? {
                break;
            }
        }
        Ok(())
    }

    /// POST `body` as JSON to `path`.
    pub fn post<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(what, r)
    }
}
