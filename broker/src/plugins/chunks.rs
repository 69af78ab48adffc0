//! Components to agents in chunks, so that brokers with small message limits work.
//!
//! A fetch request is unsigned and a few bytes long, and its answer can be a whole
//! component, so what one request can cost is bounded at every step: the request names
//! at most [`MAX_INDICES`] chunks and each is sent at most once; an agent may make
//! [`FETCH_BURST`] requests at once and one a second after that, and have
//! [`PER_AGENT`] waiting or being answered; [`SENDING`] components are sent at once
//! across agents, from one copy in memory each, and the other requests wait their turn
//! (at most [`WAITING`] of them). Which blobs an agent may fetch at all (those of jobs in
//! flight to it) is the job engine's to say: `ingress` asks it before calling here.
//! Every refusal is counted ([`FetchStats`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use drover_protocol::chunk::{self, ChunkHeader, FetchRequest};
use drover_protocol::topics::{self, Down};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::{Plugins, store};
use crate::mqtt::publisher::Delivery;
use crate::rate::{Allowances, Take};

/// The most chunks one request may name: every chunk of the largest component an agent
/// takes (64 MiB) at the smallest chunk size (1 KiB).
pub const MAX_INDICES: usize = 65_536;
/// Fetch requests an agent may make at once; after that, one per [`FETCH_REFILL_MS`].
/// An agent asks once per component, and again for what is missing after 10 s.
pub const FETCH_BURST: u32 = 16;
const FETCH_REFILL_MS: u64 = 1000;
/// Agents whose allowances are kept apart (see [`crate::rate`]).
const TRACKED: usize = 10_000;
/// Requests of one agent waiting or being answered at once.
pub const PER_AGENT: u32 = 8;
/// Components being sent at once, across agents.
pub const SENDING: usize = 8;
/// Requests waiting or being answered at once, across agents.
pub const WAITING: usize = 16_384;

/// Why a fetch request is not answered.
#[derive(Debug, thiserror::Error)]
pub enum FetchRefused {
    /// It does not parse, or asks for too much.
    #[error("fetch request refused: {0}")]
    Malformed(String),
    /// The agent is over its rate; not answered (it asks again for what is missing).
    #[error(
        "fetch request over the agent's rate ({FETCH_BURST} at once, then one a second); not answered"
    )]
    RateLimited,
    /// The agent has [`PER_AGENT`] requests waiting or being answered; not answered.
    #[error("agent has {PER_AGENT} fetch requests in hand already; not answered")]
    Busy,
    /// The server has [`WAITING`] requests in hand; not answered.
    #[error("{WAITING} fetch requests are in hand already; not answered")]
    Full,
}

impl FetchRefused {
    /// The agent event kind it is recorded under.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchRefused::Malformed(_) => "bad-message",
            FetchRefused::RateLimited | FetchRefused::Busy | FetchRefused::Full => "rate-limited",
        }
    }
}

/// Counters, for logs.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Requests answered with chunks.
    pub served: AtomicU64,
    /// Chunks sent.
    pub chunks: AtomicU64,
    /// Indices left out: repeated, or past the blob's end.
    pub indices_dropped: AtomicU64,
    /// Requests refused as malformed or too large.
    pub malformed: AtomicU64,
    /// Requests refused over an agent's rate.
    pub rate_limited: AtomicU64,
    /// Requests refused because the agent, or the server, had too many in hand.
    pub busy: AtomicU64,
    /// Requests for a blob of no job in flight to the agent.
    pub not_delivered: AtomicU64,
}

/// What serving chunks shares: allowances, bounds, and the components being sent.
pub(super) struct Fetches {
    allowances: Allowances,
    /// Requests in hand, by agent.
    per_agent: Mutex<HashMap<String, u32>>,
    /// Requests in hand, in all.
    waiting: AtomicUsize,
    sending: Arc<Semaphore>,
    /// Components being sent, by digest: one copy in memory however many agents fetch.
    blobs: Mutex<HashMap<String, Weak<Vec<u8>>>>,
    stats: FetchStats,
}

impl Default for Fetches {
    fn default() -> Fetches {
        Fetches {
            allowances: Allowances::new(FETCH_BURST, FETCH_REFILL_MS, TRACKED),
            per_agent: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            sending: Arc::new(Semaphore::new(SENDING)),
            blobs: Mutex::new(HashMap::new()),
            stats: FetchStats::default(),
        }
    }
}

/// A request in hand: counted against its agent and the server until dropped.
struct InHand {
    plugins: Plugins,
    agent: String,
}

impl Drop for InHand {
    fn drop(&mut self) {
        let f = &self.plugins.shared.fetches;
        f.waiting.fetch_sub(1, Ordering::Relaxed);
        let mut per_agent = f.per_agent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_agent.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                per_agent.remove(&self.agent);
            }
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Plugins {
    /// Counters of chunk serving.
    pub fn fetch_stats(&self) -> &FetchStats {
        &self.shared.fetches.stats
    }

    /// Takes an agent's fetch request: it must parse, name a digest and at most
    /// [`MAX_INDICES`] chunks, and be within the agent's rate.
    pub fn fetch_request(&self, agent: &str, payload: &[u8]) -> Result<FetchRequest, FetchRefused> {
        let f = &self.shared.fetches;
        let refused = |why: String| {
            f.stats.malformed.fetch_add(1, Ordering::Relaxed);
            FetchRefused::Malformed(why)
        };
        let req: FetchRequest = serde_json::from_slice(payload)
            .map_err(|e| refused(format!("not a fetch request: {e}")))?;
        if !is_sha256(&req.sha256) {
            return Err(refused("the digest is not 64 hex digits".into()));
        }
        if let Some(n) = req.indices.as_ref().map(Vec::len)
            && n > MAX_INDICES
        {
            return Err(refused(format!(
                "it names {n} chunks; no component has more than {MAX_INDICES}"
            )));
        }
        let now = self.shared.clock.now_ms();
        if let Take::Refused { first } = f.allowances.take(agent, now) {
            let n = f.stats.rate_limited.fetch_add(1, Ordering::Relaxed) + 1;
            if first {
                tracing::warn!(agent.id = %agent, rate_limited_total = n, "fetch requests over the agent's rate");
            }
            return Err(FetchRefused::RateLimited);
        }
        Ok(req)
    }

    /// Answers a request for a blob the agent may not fetch with one header saying why.
    pub fn refuse_fetch(&self, agent: &str, req: FetchRequest, reason: String) {
        let n = self
            .shared
            .fetches
            .stats
            .not_delivered
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        tracing::warn!(agent.id = %agent, sha256 = %req.sha256, not_delivered_total = n, "fetch refused: {reason}");
        let (me, agent) = (self.clone(), agent.to_string());
        tokio::spawn(async move { me.send_error(&agent, &req, reason).await });
    }

    /// Answers an agent's fetch request with the chunks it asks for (all by default,
    /// each once), or one header saying why it cannot have them. The answer is sent off
    /// the caller's path, in its turn.
    pub fn serve_chunks(&self, agent: &str, req: FetchRequest) -> Result<(), FetchRefused> {
        let f = &self.shared.fetches;
        {
            let mut per_agent = f.per_agent.lock().unwrap_or_else(|e| e.into_inner());
            let mine = per_agent.get(agent).copied().unwrap_or(0);
            let refusal = if mine >= PER_AGENT {
                Some(FetchRefused::Busy)
            } else if f.waiting.load(Ordering::Relaxed) >= WAITING {
                Some(FetchRefused::Full)
            } else {
                None
            };
            if let Some(r) = refusal {
                let n = f.stats.busy.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(agent.id = %agent, busy_total = n, "fetch refused: {r}");
                return Err(r);
            }
            *per_agent.entry(agent.to_string()).or_insert(0) += 1;
            f.waiting.fetch_add(1, Ordering::Relaxed);
        }
        let in_hand = InHand {
            plugins: self.clone(),
            agent: agent.to_string(),
        };
        let (me, agent) = (self.clone(), agent.to_string());
        let span = tracing::info_span!("fetch", agent.id = %agent, sha256 = %req.sha256);
        // Publishing many chunks waits on the link: off the incoming loop.
        tokio::spawn(
            async move {
                let _in_hand = in_hand;
                let Ok(_turn) = me.shared.fetches.sending.clone().acquire_owned().await else {
                    return;
                };
                me.send_chunks(&agent, req).await;
            }
            .instrument(span),
        );
        Ok(())
    }

    /// The blob `sha256`: the copy being sent already, or one from the store.
    async fn blob(&self, sha256: &str) -> anyhow::Result<Option<Arc<Vec<u8>>>> {
        let f = &self.shared.fetches;
        if let Some(b) = f
            .blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha256)
            .and_then(Weak::upgrade)
        {
            return Ok(Some(b));
        }
        let Some(bytes) = store::blob(&self.shared.db, sha256).await? else {
            return Ok(None);
        };
        let b = Arc::new(bytes);
        let mut blobs = f.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.retain(|_, w| w.strong_count() > 0);
        blobs.insert(sha256.to_string(), Arc::downgrade(&b));
        Ok(Some(b))
    }

    async fn send_error(&self, agent: &str, req: &FetchRequest, reason: String) {
        let h = ChunkHeader {
            request_id: req.request_id.clone(),
            sha256: req.sha256.clone(),
            index: 0,
            count: 0,
            total_len: 0,
            chunk_size: req.chunk_size,
            error: Some(reason),
        };
        let topic = topics::down(agent, Down::Chunk);
        let _ = self
            .shared
            .link
            .publish(topic, chunk::encode(&h, &[]), Delivery::AtLeastOnce)
            .await;
    }

    async fn send_chunks(&self, agent: &str, req: FetchRequest) {
        let link = &self.shared.link;
        let stats = &self.shared.fetches.stats;
        let topic = topics::down(agent, Down::Chunk);
        let chunk_size = req
            .chunk_size
            .clamp(chunk::MIN_CHUNK_SIZE, chunk::MAX_CHUNK_SIZE);
        let blob = match self.blob(&req.sha256).await {
            Ok(Some(b)) => b,
            other => {
                let reason = match other {
                    Err(e) => format!("store error: {e:#}"),
                    _ => "no such plugin blob".to_string(),
                };
                tracing::warn!(agent.id = %agent, sha256 = %req.sha256, %reason, "cannot serve plugin");
                self.send_error(agent, &req, reason).await;
                return;
            }
        };
        let count = chunk::chunk_count(blob.len() as u64, chunk_size);
        // Each chunk once, in order, however often the request names it.
        let mut wanted = vec![req.indices.is_none(); count as usize];
        let mut dropped = 0u64;
        for i in req.indices.iter().flatten() {
            match wanted.get_mut(*i as usize) {
                Some(w) if !*w => *w = true,
                _ => dropped += 1,
            }
        }
        if dropped > 0 {
            let n = stats.indices_dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
            tracing::info!(agent.id = %agent, dropped, indices_dropped_total = n, "fetch request named chunks twice or past the end");
        }
        stats.served.fetch_add(1, Ordering::Relaxed);
        let mut sent = 0u64;
        for (index, _) in wanted.iter().enumerate().filter(|(_, w)| **w) {
            let start = index * chunk_size as usize;
            let end = (start + chunk_size as usize).min(blob.len());
            let h = ChunkHeader {
                request_id: req.request_id.clone(),
                sha256: req.sha256.clone(),
                index: index as u32,
                count,
                total_len: blob.len() as u64,
                chunk_size,
                error: None,
            };
            let body = chunk::encode(&h, &blob[start..end]);
            if let Err(e) = link
                .publish(topic.clone(), body, Delivery::AtLeastOnce)
                .await
            {
                tracing::warn!(agent.id = %agent, error = %format!("{e:#}"), "could not send chunk");
                break;
            }
            sent += 1;
        }
        stats.chunks.fetch_add(sent, Ordering::Relaxed);
        tracing::debug!(agent.id = %agent, sha256 = %req.sha256, chunks = sent, "served plugin");
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use drover_protocol::keys::SigningKey;
    use drover_protocol::manifest::{Manifest, World, sha256_hex};
    use drover_protocol::signed::Signed;

    use super::*;
    use crate::audit::Audit;
    use crate::clock::Clock;
    use crate::mqtt::publisher::{Publisher, Publishing};
    use crate::plugins::types::PublishRequest;
    use crate::store::Db;

    /// Counts the chunks published.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<ChunkHeader>>);

    impl Publisher for Recorder {
        fn publish(&self, _: String, body: Vec<u8>, _: Delivery) -> Publishing<'_> {
            let (h, _) = chunk::decode(&body).unwrap();
            self.0.lock().unwrap().push(h);
            Box::pin(async { Ok(()) })
        }
    }

    async fn catalogue() -> (Plugins, Arc<Recorder>, String) {
        let db = Db::in_memory().unwrap();
        db.migrate(&crate::server::SCHEMAS).await.unwrap();
        let sent = Arc::new(Recorder::default());
        let clock = Clock::tokio(1_000_000);
        let audit = Audit::new(db.clone(), clock.clone());
        let plugins = Plugins::new(db, sent.clone(), audit, clock);
        let blob = vec![7u8; 10 * 1024];
        let manifest = Manifest {
            name: "p".into(),
            version: 1,
            sha256: sha256_hex(&blob),
            length: blob.len() as u64,
            world: World::Task,
            capabilities: Default::default(),
            issued_at: 1,
            expires_at: u64::MAX,
        };
        plugins
            .publish(PublishRequest {
                manifest: Signed::sign(&manifest, &SigningKey::generate()),
                blob_base64: base64::engine::general_purpose::STANDARD.encode(&blob),
            })
            .await
            .unwrap();
        (plugins, sent, manifest.sha256)
    }

    fn request(sha256: &str, indices: Option<Vec<u32>>) -> Vec<u8> {
        serde_json::to_vec(&FetchRequest {
            request_id: "r".into(),
            sha256: sha256.into(),
            chunk_size: 1024,
            indices,
        })
        .unwrap()
    }

    /// Waits until the answers in flight are sent.
    async fn settle(p: &Plugins) {
        while p.shared.fetches.waiting.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_chunk_is_sent_once_per_request_and_requests_are_bounded() {
        let (p, sent, sha) = catalogue().await;
        // 2,000 copies of one index, and indices past the end: one chunk.
        let mut indices = vec![3; 2000];
        indices.push(999);
        let req = p.fetch_request("a", &request(&sha, Some(indices))).unwrap();
        p.serve_chunks("a", req).unwrap();
        settle(&p).await;
        assert_eq!(sent.0.lock().unwrap().len(), 1);
        assert_eq!(
            p.fetch_stats().indices_dropped.load(Ordering::Relaxed),
            2000
        );
        // All of it: each chunk once.
        let req = p.fetch_request("a", &request(&sha, None)).unwrap();
        p.serve_chunks("a", req).unwrap();
        settle(&p).await;
        assert_eq!(sent.0.lock().unwrap().len(), 11);

        // Malformed: not a digest, or more indices than any blob has chunks.
        assert!(matches!(
            p.fetch_request("a", &request("../etc", None)),
            Err(FetchRefused::Malformed(_))
        ));
        let huge = request(&sha, Some(vec![0; MAX_INDICES + 1]));
        assert!(matches!(
            p.fetch_request("a", &huge),
            Err(FetchRefused::Malformed(_))
        ));
        // The agent's rate: two taken above, the rest of the burst, then refused.
        for _ in 2..FETCH_BURST {
            p.fetch_request("a", &request(&sha, None)).unwrap();
        }
        let over = p.fetch_request("a", &request(&sha, None)).unwrap_err();
        assert_eq!(over.kind(), "rate-limited");
        // Another agent is not held back; and after a second, one more.
        p.fetch_request("b", &request(&sha, None)).unwrap();
        tokio::time::advance(std::time::Duration::from_millis(1000)).await;
        p.fetch_request("a", &request(&sha, None)).unwrap();

        // An agent's requests in hand are bounded.
        let turns = p.shared.fetches.sending.clone();
        let held = turns.acquire_many_owned(SENDING as u32).await.unwrap();
        for _ in 0..PER_AGENT {
            let req: FetchRequest = serde_json::from_slice(&request(&sha, None)).unwrap();
            p.serve_chunks("c", req).unwrap();
        }
        let req: FetchRequest = serde_json::from_slice(&request(&sha, None)).unwrap();
        assert!(matches!(p.serve_chunks("c", req), Err(FetchRefused::Busy)));
        drop(held);
        settle(&p).await;
        assert_eq!(sent.0.lock().unwrap().len(), 11 + 10 * PER_AGENT as usize);
    }
}
