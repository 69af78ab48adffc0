//! Reporting: results signed with the agent's key into the outbox (which publishes them
//! until the control plane acknowledges them), and progress reports (started, live
//! output), which are best effort.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_protocol::job::{
    FailureKind, JobResult, Progress, ProgressEvent, ResultAck, ResultStatus, StreamName,
};
use drover_protocol::link::LinkHandle;
use drover_protocol::now_ms;
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Up};
use tokio::sync::mpsc;

use super::Jobs;
use crate::identity::Identity;
use crate::sandbox::exec::LiveChunk;

/// Largest piece of live output in one progress message.
const LIVE_BATCH: usize = 32 << 10;
/// Largest text in one live-output message, so that followers' backlogs stay small.
const LIVE_PIECE: usize = 16 << 10;
/// How long live output gathers before it goes out.
const LIVE_LINGER: Duration = Duration::from_millis(50);
/// How long a job runs before its `Started` report goes out (sooner if it has output).
/// A job done before that is reported by its result alone: for the many short jobs of a
/// fleet-wide command, that halves the messages the control plane must check and store.
pub const STARTED_AFTER: Duration = Duration::from_millis(200);

impl Jobs {
    /// An ack for a result: the result leaves the outbox only if the ack is signed by a
    /// control-plane key of this agent's key set, is addressed to this agent, and names
    /// the very message the outbox holds. Anything else is refused, logged and counted,
    /// and the result is sent again until a true ack comes.
    pub fn acknowledged(&self, payload: &[u8]) {
        let keyset = self.state.keyset();
        let ack = serde_json::from_slice::<Signed<ResultAck>>(payload)
            .map_err(|e| format!("not a signed ack: {e}"))
            .and_then(|s| {
                s.verify(&keyset.control_plane)
                    .map_err(|e| format!("not signed by a control-plane key: {e}"))
            })
            .and_then(|ack| {
                if ack.agent_id == self.config.id {
                    Ok(ack)
                } else {
                    Err(format!("addressed to agent {:?}", ack.agent_id))
                }
            });
        let refused = |why: String| {
            let n = self.stats.acks_refused.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                refused_total = n,
                "result ack refused, the result stays in the outbox: {why}"
            );
        };
        match ack {
            Ok(ack)
                if self
                    .outbox
                    .ack(&ack.job_id, ack.attempt, &ack.result_sha256) =>
            {
                tracing::debug!(job.id = %ack.job_id, "result acknowledged");
            }
            // A second ack for a result already gone is no news (acks go at most once,
            // but results are sent again until one arrives).
            Ok(ack) if !self.outbox.holds(&ack.job_id, ack.attempt) => {
                tracing::debug!(job.id = %ack.job_id, "ack for a result no longer held");
            }
            Ok(ack) => refused(format!(
                "job {} attempt {}: the ack names another message ({})",
                ack.job_id, ack.attempt, ack.result_sha256
            )),
            Err(why) => refused(why),
        }
    }

    /// Counts and logs a finished (or refused) job, and publishes its result.
    pub(super) async fn report(&self, result: &JobResult) {
        if result.status == ResultStatus::Rejected {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.ran.fetch_add(1, Ordering::Relaxed);
        }
        match &result.failure {
            None => tracing::info!(
                job.id = %result.job_id,
                plugin = %result.plugin,
                duration_ms = result.duration_ms,
                "job succeeded"
            ),
            Some(f) => tracing::warn!(
                job.id = %result.job_id,
                plugin = %result.plugin,
                status = result.status.as_str(),
                kind = ?f.kind,
                "job {}: {}",
                result.status.as_str(),
                f.message
            ),
        }
        self.publish(result).await;
    }

    /// Signs a result and puts it in the outbox, which publishes it until the control
    /// plane acknowledges it. If the disk refuses it, it is still published once, and
    /// the failure is logged and counted.
    pub(super) async fn publish(&self, result: &JobResult) {
        // Signed with the agent's own key: the broker cannot forge or alter results.
        let signed = Signed::sign(result, &self.identity.signing);
        let body = match serde_json::to_vec(&signed) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "could not encode result");
                return;
            }
        };
        // A refusal of an envelope that could not be authenticated (or was seen before)
        // speaks for no job this agent took on: anyone on the path can provoke one, with
        // any job id. Sent once for the record, it never enters the outbox, where it
        // would share the (job, attempt) key of a real result.
        let unauthenticated = result.status == ResultStatus::Rejected
            && result.failure.as_ref().is_some_and(|f| {
                matches!(
                    f.kind,
                    FailureKind::BadEnvelope | FailureKind::Misaddressed | FailureKind::Replayed
                )
            });
        if unauthenticated {
            self.stats
                .unauthenticated_refusals
                .fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self
                .link
                .publish(topics::up(&self.config.id, Up::Result), body, false)
                .await
            {
                tracing::warn!(job.id = %result.job_id, error = %e, "could not publish refusal");
            }
            return;
        }
        if let Err(e) = self.outbox.push(&result.job_id, result.attempt, &body) {
            let n = self.stats.unstored.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(
                job.id = %result.job_id,
                unstored_total = n,
                "result could not be stored durably, so it is sent once without a retry: {e:#}"
            );
            if let Err(e) = self
                .link
                .publish(topics::up(&self.config.id, Up::Result), body, false)
                .await
            {
                tracing::error!(job.id = %result.job_id, error = %e, "could not publish result");
            }
        }
    }

    /// What sends this agent's progress reports.
    pub(super) fn reporter(&self) -> Reporter {
        Reporter {
            link: self.link.clone(),
            identity: self.identity.clone(),
            agent_id: self.config.id.clone(),
            dropped: self.progress_dropped.clone(),
        }
    }
}

/// Sends signed progress reports for one agent.
pub struct Reporter {
    link: LinkHandle,
    identity: Arc<Identity>,
    agent_id: String,
    dropped: Arc<AtomicU64>,
}

impl Reporter {
    fn send(&self, job_id: &str, attempt: u32, seq: &mut u64, event: ProgressEvent) {
        let p = Progress {
            job_id: job_id.to_string(),
            agent_id: self.agent_id.clone(),
            attempt,
            seq: *seq,
            at_ms: now_ms(),
            event,
        };
        *seq += 1;
        let body = serde_json::to_vec(&Signed::sign(&p, &self.identity.signing))
            .expect("progress reports serialise");
        // Never waits: progress is a view, and must not hold up jobs or results.
        if let Err(e) = self
            .link
            .try_publish(topics::up(&self.agent_id, Up::Progress), body)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(job.id = %job_id, error = %e, "progress not sent");
        }
    }
}

/// Reports the job started, once it has run for [`STARTED_AFTER`] or has output, then
/// sends live output as progress reports, gathered into pieces of up to [`LIVE_BATCH`]
/// bytes, until the run ends. Forwards at most `cap` bytes per stream; returns how many
/// bytes it dropped.
pub async fn forward_live(
    reporter: Reporter,
    job_id: String,
    attempt: u32,
    mut rx: mpsc::Receiver<LiveChunk>,
    cap: u64,
) -> u64 {
    let mut seq = 0u64;
    let mut send = |event| reporter.send(&job_id, attempt, &mut seq, event);
    let mut early = match tokio::time::timeout(STARTED_AFTER, rx.recv()).await {
        // Over already: its result says all.
        Ok(None) => return 0,
        Ok(Some(chunk)) => Some(chunk),
        Err(_) => None,
    };
    send(ProgressEvent::Started);
    let mut sent = [0u64; 2];
    let mut dropped = 0u64;
    let mut tails: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut closed = false;
    while !closed {
        let first = match early.take() {
            Some(chunk) => chunk,
            None => match rx.recv().await {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let mut batch = vec![first];
        let flush_at = tokio::time::Instant::now() + LIVE_LINGER;
        while batch.iter().map(|c| c.data.len()).sum::<usize>() < LIVE_BATCH {
            match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(c)) => batch.push(c),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        for (i, stream) in [StreamName::Stdout, StreamName::Stderr]
            .into_iter()
            .enumerate()
        {
            let mut bytes = std::mem::take(&mut tails[i]);
            for c in batch.iter().filter(|c| c.stream == stream) {
                bytes.extend_from_slice(&c.data);
            }
            if bytes.is_empty() {
                continue;
            }
            let room = cap.saturating_sub(sent[i]) as usize;
            if bytes.len() > room {
                dropped += (bytes.len() - room) as u64;
                bytes.truncate(room);
            }
            // A piece that ends inside a UTF-8 sequence keeps the rest for the next one.
            if !closed
                && let Err(e) = std::str::from_utf8(&bytes)
                && e.error_len().is_none()
            {
                tails[i] = bytes.split_off(e.valid_up_to());
            }
            if bytes.is_empty() {
                continue;
            }
            sent[i] += bytes.len() as u64;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            for piece in split_text(&text, LIVE_PIECE) {
                send(ProgressEvent::Output {
                    stream,
                    text: piece.to_string(),
                });
            }
        }
    }
    dropped
}

/// Splits `s` into pieces of at most `max` bytes, on character boundaries.
fn split_text(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_split_on_character_boundaries() {
        assert_eq!(split_text("abcdef", 4), ["abcd", "ef"]);
        assert_eq!(split_text("aé", 2), ["a", "é"]);
        assert!(split_text("", 4).is_empty());
    }
}
