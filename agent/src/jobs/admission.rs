//! Admission: whether a job envelope may run at all, before anything about its plugin
//! is looked at. An envelope is admitted only if it is signed by a control-plane key of
//! the current key set, addressed to this agent, fresh, and not seen before (recorded
//! on disk before it runs), and no copy of it is in hand.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use drover_protocol::job::{FailureKind, JobEnvelope, JobResult};
use drover_protocol::signed::Signed;

use super::{Job, Jobs, Provenance};
use crate::durable::outbox::Outbox;
use crate::durable::state::{EnvelopeRefusal, State};

/// How far the agent's clock may be behind the control plane's.
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// Why an envelope is not run.
#[derive(Debug)]
pub enum NotRun {
    /// Refused: the result says why, and goes to the control plane.
    Refused(Box<JobResult>),
    /// Another copy of an envelope this agent has already taken: one in hand (running,
    /// or its result waiting in the outbox), or one the control plane marked as sent
    /// again (it does that for unanswered envelopes when an agent reconnects). Ignored
    /// without a report: the one result answers both. A replay of an original envelope
    /// the agent is done with is still refused and reported.
    Duplicate {
        /// The job.
        job_id: String,
        /// The attempt.
        attempt: u32,
    },
}

impl From<Box<JobResult>> for NotRun {
    fn from(r: Box<JobResult>) -> NotRun {
        NotRun::Refused(r)
    }
}

/// The admission checks of one agent.
pub struct Admission {
    agent_id: String,
    state: Arc<State>,
    outbox: Arc<Outbox>,
    /// (job id, attempt) of envelopes admitted by this process whose result is not in
    /// the outbox yet. Claimed before the seen set is asked, so that of two copies of
    /// one envelope arriving together exactly one runs and the other is a duplicate.
    in_hand: Mutex<HashSet<(String, u32)>>,
}

impl Admission {
    /// Admission for agent `agent_id`, with its key set and seen set in `state` and its
    /// unacknowledged results in `outbox`.
    pub fn new(agent_id: &str, state: Arc<State>, outbox: Arc<Outbox>) -> Admission {
        Admission {
            agent_id: agent_id.to_string(),
            state,
            outbox,
            in_hand: Mutex::default(),
        }
    }

    fn in_hand(&self) -> std::sync::MutexGuard<'_, HashSet<(String, u32)>> {
        self.in_hand.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parses and verifies an envelope's signature, nothing more.
    pub fn check_signature(&self, payload: &[u8]) -> Result<JobEnvelope, Box<JobResult>> {
        let me = &self.agent_id;
        let signed: Signed<JobEnvelope> = serde_json::from_slice(payload).map_err(|e| {
            Box::new(JobResult::refused(
                "",
                me,
                0,
                FailureKind::BadEnvelope,
                format!("job envelope is not valid JSON: {e}"),
            ))
        })?;
        // Until the signature checks out, the envelope's own claims are only used to say
        // which job a refusal is about.
        let claimed = signed.unverified().ok();
        signed
            .verify(&self.state.keyset().control_plane)
            .map_err(|e| {
                let (id, attempt) = claimed.map(|c| (c.job_id, c.attempt)).unwrap_or_default();
                Box::new(JobResult::refused(
                    &id,
                    me,
                    attempt,
                    FailureKind::BadEnvelope,
                    format!("job envelope refused: {e}"),
                ))
            })
    }

    /// Checks an envelope at `now_ms`: encoding, signature, address, freshness, replay.
    /// An admitted job is in hand until [`Admission::release`].
    pub fn check(&self, payload: &[u8], now_ms: u64) -> Result<Job, NotRun> {
        let me = &self.agent_id;
        let env = self.check_signature(payload)?;
        let refuse = |kind, message: String| {
            NotRun::Refused(Box::new(JobResult::refused(
                &env.job_id,
                me,
                env.attempt,
                kind,
                message,
            )))
        };
        if &env.agent_id != me {
            return Err(refuse(
                FailureKind::Misaddressed,
                format!("job is addressed to agent {:?}, not this one", env.agent_id),
            ));
        }
        let now = now_ms;
        if now + CLOCK_SKEW_MS < env.not_before_ms {
            return Err(refuse(
                FailureKind::Stale,
                format!(
                    "job is not valid until {} ms from now",
                    env.not_before_ms - now
                ),
            ));
        }
        if now > env.expires_at_ms {
            return Err(refuse(
                FailureKind::Stale,
                format!("job expired {} ms ago", now - env.expires_at_ms),
            ));
        }
        let key = (env.job_id.clone(), env.attempt);
        let duplicate = || NotRun::Duplicate {
            job_id: env.job_id.clone(),
            attempt: env.attempt,
        };
        if !self.in_hand().insert(key.clone()) {
            return Err(duplicate());
        }
        // Remembered on disk before anything runs, so a restart cannot reopen the door.
        let accepted = self.state.accept_envelope(
            &env.job_id,
            env.attempt,
            env.expires_at_ms,
            now,
            CLOCK_SKEW_MS,
        );
        if accepted.is_err() {
            self.in_hand().remove(&key);
        }
        match accepted {
            Ok(()) => Ok(Job {
                id: env.job_id,
                attempt: env.attempt,
                plugin: env.plugin,
                input: env.input,
                parameters: env.parameters,
                limits: env.limits,
                provenance: Provenance::Envelope { resent: env.resent },
            }),
            // A copy the control plane sent again, or one whose answer is still in the
            // outbox (which sends it again until acknowledged).
            Err(EnvelopeRefusal::Replayed)
                if env.resent || self.outbox.holds(&env.job_id, env.attempt) =>
            {
                Err(duplicate())
            }
            Err(EnvelopeRefusal::Replayed) => Err(refuse(
                FailureKind::Replayed,
                "job envelope was already received once; replay refused".into(),
            )),
            Err(EnvelopeRefusal::Unrecordable(e)) => Err(refuse(
                FailureKind::AgentError,
                format!("cannot record the job for replay protection, so it is refused: {e}"),
            )),
        }
    }

    /// The job's result is in the outbox: a later copy is answered from there.
    pub fn release(&self, key: &(String, u32)) {
        self.in_hand().remove(key);
    }
}

impl Jobs {
    /// Answers a job that found the queue full: counted, logged, and reported as a
    /// retryable refusal so the operator is not left waiting.
    pub async fn refuse_busy(&self, payload: &[u8]) {
        use std::sync::atomic::Ordering;
        let n = self.stats.dropped_busy.fetch_add(1, Ordering::Relaxed) + 1;
        // Only an envelope the control plane signed gets a durable answer; anything else
        // is refused like any unverifiable envelope.
        let env = match self.admission.check_signature(payload) {
            Ok(env) => env,
            Err(refusal) => {
                tracing::warn!(
                    dropped_total = n,
                    "job queue full, and the envelope does not verify"
                );
                self.publish(&refusal).await;
                return;
            }
        };
        if self.state.was_accepted(&env.job_id, env.attempt) {
            // A redelivery of a job already taken on: its own result will answer.
            tracing::info!(job.id = %env.job_id, "job queue full; a repeat of an accepted job dropped");
            return;
        }
        if env.resent {
            // A copy the control plane sent again; its original may be waiting in the
            // queue, and a refusal now would answer for it. If not, the next hello
            // brings another copy.
            tracing::warn!(job.id = %env.job_id, dropped_total = n, "job queue full; a copy sent again dropped");
            return;
        }
        tracing::error!(job.id = %env.job_id, dropped_total = n, "job queue full; job refused");
        let mut r = JobResult::refused(
            &env.job_id,
            &self.config.id,
            env.attempt,
            FailureKind::AgentError,
            format!(
                "agent is busy: its queue of {} jobs is full",
                self.config.job_queue
            ),
        );
        if let Some(f) = r.failure.as_mut() {
            f.retryable = true;
        }
        self.publish(&r).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::keys::SigningKey;
    use drover_protocol::keyset::KeySet;
    use drover_protocol::manifest::{Capabilities, Manifest, World};
    use std::path::PathBuf;

    struct Fixture {
        dir: PathBuf,
        control: SigningKey,
        admission: Admission,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("drover-admission-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (root, control) = (SigningKey::generate(), SigningKey::generate());
        let ks = KeySet {
            version: 1,
            roots: vec![root.public()],
            root_threshold: 1,
            publishers: vec![SigningKey::generate().public()],
            publisher_threshold: 1,
            control_plane: vec![control.public()],
            issued_at: 0,
        };
        let init = dir.join("keyset.json");
        std::fs::write(
            &init,
            serde_json::to_vec(&Signed::sign(&ks, &root)).unwrap(),
        )
        .unwrap();
        let state = State::open(&dir.join("state"), &[root.public()], 1, Some(&init), 0).unwrap();
        let outbox = Outbox::open(&dir.join("outbox"), Default::default()).unwrap();
        Fixture {
            admission: Admission::new("me", Arc::new(state), Arc::new(outbox)),
            dir,
            control,
        }
    }

    fn envelope(key: &SigningKey, job: &str, to: &str, not_before: u64, expires: u64) -> Vec<u8> {
        let manifest = Manifest {
            name: "p".into(),
            version: 1,
            sha256: "0".repeat(64),
            length: 1,
            world: World::Task,
            capabilities: Capabilities::default(),
            issued_at: 0,
            expires_at: u64::MAX,
        };
        let env = JobEnvelope {
            job_id: job.into(),
            agent_id: to.into(),
            attempt: 1,
            plugin: Signed::sign(&manifest, key),
            input: serde_json::json!({}),
            parameters: Default::default(),
            limits: Default::default(),
            not_before_ms: not_before,
            expires_at_ms: expires,
            resent: false,
        };
        serde_json::to_vec(&Signed::sign(&env, key)).unwrap()
    }

    fn refusal(r: Result<Job, NotRun>) -> (FailureKind, String) {
        match r {
            Err(NotRun::Refused(r)) => {
                let f = r.failure.unwrap();
                (f.kind, f.message)
            }
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn freshness_is_judged_at_the_time_given() {
        let f = fixture("fresh");
        let env = envelope(&f.control, "j1", "me", 100_000, 200_000);
        // Early, but within the clock skew allowed; then far too early; then expired.
        let (kind, why) = refusal(f.admission.check(&env, 100_000 - CLOCK_SKEW_MS - 1));
        assert_eq!(kind, FailureKind::Stale);
        assert!(why.contains("not valid until 60001 ms from now"), "{why}");
        let (kind, why) = refusal(f.admission.check(&env, 200_001));
        assert_eq!(kind, FailureKind::Stale);
        assert_eq!(why, "job expired 1 ms ago");
        let job = f.admission.check(&env, 100_000 - CLOCK_SKEW_MS).unwrap();
        assert_eq!(job.provenance, Provenance::Envelope { resent: false });
    }

    #[test]
    fn copies_in_hand_are_duplicates_and_replays_are_refused() {
        let f = fixture("replay");
        let env = envelope(&f.control, "j2", "me", 0, 10_000);
        let job = f.admission.check(&env, 1000).unwrap();
        assert!(matches!(
            f.admission.check(&env, 1000),
            Err(NotRun::Duplicate { .. })
        ));
        f.admission.release(&(job.id, job.attempt));
        let (kind, _) = refusal(f.admission.check(&env, 1000));
        assert_eq!(kind, FailureKind::Replayed);
        // Not ours, or not signed by the control plane.
        let (kind, _) = refusal(
            f.admission
                .check(&envelope(&f.control, "j3", "other", 0, 10_000), 1000),
        );
        assert_eq!(kind, FailureKind::Misaddressed);
        let forged = envelope(&SigningKey::generate(), "j4", "me", 0, 10_000);
        let (kind, _) = refusal(f.admission.check(&forged, 1000));
        assert_eq!(kind, FailureKind::BadEnvelope);
    }
}
