//! Components to agents in chunks, so that brokers with small message limits work.

use drover_protocol::chunk::{self, ChunkHeader, FetchRequest};
use drover_protocol::topics::{self, Down};
use tracing::Instrument as _;

use super::{Plugins, store};
use crate::mqtt::publisher::Delivery;

impl Plugins {
    /// Answers an agent's fetch request with the chunks it asks for (all by default),
    /// or one header saying why it cannot have them.
    pub async fn serve_chunks(&self, agent: &str, payload: &[u8]) -> anyhow::Result<()> {
        let req: FetchRequest = serde_json::from_slice(payload)?;
        let (me, agent) = (self.clone(), agent.to_string());
        let span = tracing::info_span!("fetch", agent.id = %agent, sha256 = %req.sha256);
        // Publishing many chunks waits on the link: off the incoming loop.
        tokio::spawn(async move { me.send_chunks(&agent, req).await }.instrument(span));
        Ok(())
    }

    async fn send_chunks(&self, agent: &str, req: FetchRequest) {
        let link = &self.shared.link;
        let topic = topics::down(agent, Down::Chunk);
        let chunk_size = req
            .chunk_size
            .clamp(chunk::MIN_CHUNK_SIZE, chunk::MAX_CHUNK_SIZE);
        let blob = match store::blob(&self.shared.db, &req.sha256).await {
            Ok(Some(b)) => b,
            other => {
                let reason = match other {
                    Err(e) => format!("store error: {e:#}"),
                    _ => "no such plugin blob".to_string(),
                };
                tracing::warn!(agent.id = %agent, sha256 = %req.sha256, %reason, "cannot serve plugin");
                let h = ChunkHeader {
                    request_id: req.request_id,
                    sha256: req.sha256,
                    index: 0,
                    count: 0,
                    total_len: 0,
                    chunk_size,
                    error: Some(reason),
                };
                let _ = link
                    .publish(topic, chunk::encode(&h, &[]), Delivery::AtLeastOnce)
                    .await;
                return;
            }
        };
        let count = chunk::chunk_count(blob.len() as u64, chunk_size);
        let indices: Vec<u32> = match req.indices {
            Some(v) => v.into_iter().filter(|i| *i < count).collect(),
            None => (0..count).collect(),
        };
        tracing::debug!(agent.id = %agent, sha256 = %req.sha256, chunks = indices.len(), "serving plugin");
        for index in indices {
            let start = index as usize * chunk_size as usize;
            let end = (start + chunk_size as usize).min(blob.len());
            let h = ChunkHeader {
                request_id: req.request_id.clone(),
                sha256: req.sha256.clone(),
                index,
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
                return;
            }
        }
    }
}
