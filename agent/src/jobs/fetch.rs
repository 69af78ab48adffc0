//! Fetching plugin blobs from the control plane over MQTT, in chunks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drover_protocol::chunk::{self, ChunkHeader, FetchRequest};
use drover_protocol::link::LinkHandle;
use drover_protocol::topics::{self, Up};
use tokio::sync::mpsc;

/// How long to wait for the next chunk before asking again for what is missing.
const CHUNK_WAIT: Duration = Duration::from_secs(10);
/// How many times to ask again for missing chunks.
const ROUNDS: u32 = 3;

/// Where one fetch receives its chunks.
type ChunkSender = mpsc::Sender<(ChunkHeader, Bytes)>;

/// Routes chunk messages to the fetch that asked for them.
#[derive(Clone, Default)]
pub struct Fetcher {
    pending: Arc<Mutex<HashMap<String, ChunkSender>>>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The control plane said it cannot serve the blob.
    #[error("the control plane cannot serve plugin {sha256}: {reason}")]
    Refused {
        /// The blob.
        sha256: String,
        /// Its reason.
        reason: String,
    },
    /// Chunks did not arrive.
    #[error(
        "plugin {sha256} did not arrive: {missing} of {count} chunks missing after {rounds} requests"
    )]
    Incomplete {
        /// The blob.
        sha256: String,
        /// Chunks missing.
        missing: u32,
        /// Chunks in all.
        count: u32,
        /// Requests made.
        rounds: u32,
    },
    /// The control plane's idea of the blob disagrees with the manifest.
    #[error("plugin {sha256} is {actual} bytes on the server but the manifest says {expected}")]
    WrongLength {
        /// The blob.
        sha256: String,
        /// The manifest's length.
        expected: u64,
        /// The server's.
        actual: u64,
    },
    /// The request could not be sent.
    #[error("could not ask for plugin: {0}")]
    Link(String),
}

impl Fetcher {
    /// Hands a chunk frame to its fetch. Frames for no pending fetch are dropped.
    pub fn deliver(&self, frame: Bytes) {
        let (header, data) = match chunk::decode(&frame) {
            Ok((h, d)) => {
                let d = frame.slice_ref(d);
                (h, d)
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping malformed chunk");
                return;
            }
        };
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&header.request_id)
            .cloned();
        match tx {
            Some(tx) => {
                if tx.try_send((header, data)).is_err() {
                    tracing::debug!("chunk for a fetch that is not keeping up; it will ask again");
                }
            }
            None => tracing::debug!(request_id = %header.request_id, "chunk for no pending fetch"),
        }
    }

    /// Fetches the blob `sha256` of `expected_len` bytes.
    pub async fn fetch(
        &self,
        link: &LinkHandle,
        agent_id: &str,
        sha256: &str,
        expected_len: u64,
        chunk_size: u32,
    ) -> Result<Vec<u8>, FetchError> {
        let request_id = random_id();
        let count = chunk::chunk_count(expected_len, chunk_size);
        let (tx, mut rx) = mpsc::channel(count.min(1024) as usize + 8);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.clone(), tx);
        let _guard = PendingGuard {
            fetcher: self.clone(),
            request_id: request_id.clone(),
        };

        let mut blob = vec![0u8; expected_len as usize];
        let mut have = vec![false; count as usize];
        let mut missing = count;
        let mut indices: Option<Vec<u32>> = None;
        for round in 1..=ROUNDS {
            let req = FetchRequest {
                request_id: request_id.clone(),
                sha256: sha256.to_string(),
                chunk_size,
                indices: indices.clone(),
            };
            let body = serde_json::to_vec(&req).expect("fetch requests serialise");
            link.publish(topics::up(agent_id, Up::Fetch), body, false)
                .await
                .map_err(|e| FetchError::Link(e.to_string()))?;
            loop {
                let next = tokio::time::timeout(CHUNK_WAIT, rx.recv()).await;
                let Ok(Some((h, data))) = next else { break };
                if let Some(reason) = h.error {
                    return Err(FetchError::Refused {
                        sha256: sha256.to_string(),
                        reason,
                    });
                }
                if h.sha256 != sha256 || h.chunk_size != chunk_size || h.count != count {
                    tracing::warn!(request_id = %request_id, "ignoring chunk that does not match the request");
                    continue;
                }
                if h.total_len != expected_len {
                    return Err(FetchError::WrongLength {
                        sha256: sha256.to_string(),
                        expected: expected_len,
                        actual: h.total_len,
                    });
                }
                let start = h.index as u64 * chunk_size as u64;
                let end = (start + data.len() as u64).min(expected_len);
                let want = (expected_len - start).min(chunk_size as u64);
                if data.len() as u64 != want || have[h.index as usize] {
                    continue;
                }
                blob[start as usize..end as usize].copy_from_slice(&data);
                have[h.index as usize] = true;
                missing -= 1;
                if missing == 0 {
                    return Ok(blob);
                }
            }
            tracing::warn!(
                sha256,
                missing,
                count,
                round,
                "plugin chunks missing; asking again"
            );
            indices = Some(
                have.iter()
                    .enumerate()
                    .filter(|(_, h)| !**h)
                    .map(|(i, _)| i as u32)
                    .collect(),
            );
        }
        Err(FetchError::Incomplete {
            sha256: sha256.to_string(),
            missing,
            count,
            rounds: ROUNDS,
        })
    }
}

struct PendingGuard {
    fetcher: Fetcher,
    request_id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.fetcher
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.request_id);
    }
}

/// 16 random bytes as hex.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}
