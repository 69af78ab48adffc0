//! The engine on tokio's paused clock: a real store, a publisher that records instead of
//! an MQTT link, and time moved by hand.

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use drover_protocol::agent::Hello;
use drover_protocol::job::JobEnvelope;
use drover_protocol::keyset::KeySet;
use drover_protocol::manifest::{Manifest, World, sha256_hex};
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Down};

use super::types::{RateRequest, TargetState};
use super::*;
use crate::audit::Audit;
use crate::fleet::FleetParts;
use crate::mqtt::publisher::{Delivery, Publisher, Publishing};
use crate::paths::DataDir;
use crate::plugins::types::PublishRequest;

/// Remembers what was published.
#[derive(Default)]
struct Recorder(Mutex<Vec<(String, Vec<u8>)>>);

impl Publisher for Recorder {
    fn publish(&self, topic: String, body: Vec<u8>, _: Delivery) -> Publishing<'_> {
        self.0.lock().unwrap().push((topic, body));
        Box::pin(async { Ok(()) })
    }
}

impl Recorder {
    /// The envelopes sent to `agent`, in order.
    fn envelopes(&self, agent: &str) -> Vec<JobEnvelope> {
        let topic = topics::down(agent, Down::Job);
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, b)| {
                serde_json::from_slice::<Signed<JobEnvelope>>(b)
                    .unwrap()
                    .unverified()
                    .unwrap()
            })
            .collect()
    }
}

struct Engine {
    jobs: Jobs,
    db: Db,
    events: EventLog,
    sent: Arc<Recorder>,
    stop: CancellationToken,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An engine with agents `online` and `offline`, and a published `task` plugin `p`.
async fn engine(clock: Clock) -> Engine {
    let dir = std::env::temp_dir().join(format!(
        "drover-engine-{}-{}",
        std::process::id(),
        new_job_id(drover_protocol::now_ms())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let db = Db::in_memory().unwrap();
    db.migrate(&crate::server::SCHEMAS).await.unwrap();
    let sent = Arc::new(Recorder::default());
    let link: Link = sent.clone();
    let events = EventLog::new(db.clone(), clock.clone());
    let audit = Audit::new(db.clone(), clock.clone());
    let (root, publisher, control) = (
        SigningKey::generate(),
        SigningKey::generate(),
        SigningKey::generate(),
    );
    let keyset = KeySet {
        version: 1,
        roots: vec![root.public()],
        root_threshold: 1,
        publishers: vec![publisher.public()],
        publisher_threshold: 1,
        control_plane: vec![control.public()],
        issued_at: 1,
    };
    let trust = crate::trust::Trust::new(
        DataDir::new(&dir),
        Signed::sign(&keyset, &root),
        link.clone(),
    );
    let fleet = Fleet::new(FleetParts {
        db: db.clone(),
        events: events.clone(),
        audit: audit.clone(),
        trust,
        clock: clock.clone(),
        broker: None,
        broker_url: "mqtt://127.0.0.1:1883".into(),
    });
    let plugins = Plugins::new(db.clone(), link.clone(), audit.clone(), clock.clone());
    let blob = b"\0asm-not-really".to_vec();
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
            manifest: Signed::sign(&manifest, &publisher),
            blob_base64: base64::engine::general_purpose::STANDARD.encode(&blob),
        })
        .await
        .unwrap();
    let now = clock.now_ms();
    for (agent, online) in [("online", true), ("offline", false)] {
        crate::fleet::store::record_presence(&db, &events, agent, online, now)
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let (jobs, _ticker) = Jobs::start(
        JobsParts {
            db: db.clone(),
            link,
            signer: control,
            clock,
            events: events.clone(),
            audit,
            fleet,
            plugins,
        },
        stop.clone(),
    )
    .await;
    Engine {
        jobs,
        db,
        events,
        sent,
        stop,
        _dir: TempDir(dir),
    }
}

fn request(rate: Option<RateRequest>) -> JobRequest {
    JobRequest {
        plugin: "p".into(),
        version: None,
        targets: "online,offline".into(),
        input: serde_json::json!({"x": 1}),
        timeout_secs: Some(10),
        memory_mib: None,
        output_kib: None,
        delivery_secs: Some(60),
        parameters: Default::default(),
        secrets: Default::default(),
        rate,
    }
}

async fn state(e: &Engine, job: &str, agent: &str) -> (TargetState, Option<String>) {
    let t = store::targets(&e.db, job, 0)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.agent_id == agent)
        .unwrap();
    (t.state, t.detail)
}

#[tokio::test(start_paused = true)]
async fn an_offline_target_of_a_rate_controlled_job_waits_then_is_undeliverable_at_its_deadline() {
    let clock = Clock::tokio(1_000_000);
    let e = engine(clock).await;
    let created = e
        .jobs
        .submit(request(Some(RateRequest::default())))
        .await
        .unwrap();
    let job = created.job_id.as_str();
    // The online agent has its envelope; the offline one waits for its agent.
    let env = e.sent.envelopes("online");
    assert_eq!(env.len(), 1);
    assert_eq!(
        (env[0].job_id.as_str(), env[0].input["x"].as_i64()),
        (job, Some(1))
    );
    assert_eq!(env[0].expires_at_ms, 1_000_000 + 60_000);
    assert!(e.sent.envelopes("offline").is_empty());
    assert_eq!(state(&e, job, "offline").await.0, TargetState::Pending);

    // Not yet.
    tokio::time::advance(Duration::from_secs(59)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&e, job, "offline").await.0, TargetState::Pending);

    // Past the delivery deadline, the next tick settles it, and says so in the log.
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, detail) = state(&e, job, "offline").await;
    assert_eq!(s, TargetState::Undeliverable);
    assert_eq!(
        detail.as_deref(),
        Some("the agent was not reachable before the delivery timeout")
    );
    // The online target, delivered and never started, is undeliverable too: the agent
    // would refuse the envelope as expired.
    assert_eq!(state(&e, job, "online").await.0, TargetState::Undeliverable);
    let finished = e
        .jobs
        .finished(
            &crate::events::store::read_after(&e.db, 0, 100)
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    let agents: Vec<&str> = finished
        .iter()
        .map(|f| f.target.agent_id.as_str())
        .collect();
    assert_eq!(agents.len(), 2, "{agents:?}");
    assert!(
        finished
            .iter()
            .all(|f| f.target.state == TargetState::Undeliverable && f.result.is_none())
    );
    assert_eq!(
        e.jobs.active_count(),
        0,
        "a job whose targets are all final is done"
    );
    e.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_plain_job_goes_to_every_target_at_once_and_a_returning_agent_gets_what_it_missed() {
    let clock = Clock::tokio(5_000_000);
    let e = engine(clock.clone()).await;
    let stop = CancellationToken::new();
    let mut consumers = e
        .events
        .start(vec![e.jobs.consumer()], stop.clone())
        .await
        .unwrap();
    let created = e.jobs.submit(request(None)).await.unwrap();
    // Without rate control nothing waits: the broker queues the offline agent's copy.
    assert_eq!(e.sent.envelopes("online").len(), 1);
    assert_eq!(e.sent.envelopes("offline").len(), 1);
    assert_eq!(
        state(&e, &created.job_id, "offline").await.0,
        TargetState::Delivered
    );

    // The agent says hello later: what it was sent before is sent again, marked as a
    // copy (the broker may have lost the first).
    tokio::time::advance(Duration::from_secs(5)).await;
    let hello = Hello {
        agent_id: "offline".into(),
        hostname: "h".into(),
        os: "linux".into(),
        os_version: String::new(),
        arch: String::new(),
        agent_version: String::new(),
        tags: Default::default(),
        started_at_ms: 0,
        keyset_version: 1,
        sent_at_ms: clock.now_ms(),
    };
    let crate::fleet::store::Fresh::Taken(event) =
        crate::fleet::store::record_hello(&e.db, &e.events, &hello, clock.now_ms())
            .await
            .unwrap()
    else {
        panic!("a fresh hello was refused");
    };
    e.events.committed(event);
    assert!(e.events.wait_handled(event, Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let copies = e.sent.envelopes("offline");
    assert_eq!(copies.len(), 2);
    assert!(!copies[0].resent && copies[1].resent);
    assert_eq!(copies[0].job_id, copies[1].job_id);
    stop.cancel();
    while consumers.join_next().await.is_some() {}
    e.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn secrets_are_sealed_to_each_target_and_kept_for_targets_not_sent_yet() {
    let clock = Clock::tokio(9_000_000);
    let e = engine(clock).await;
    // Both agents enroll a sealing key.
    let keys: Vec<_> = ["online", "offline"]
        .iter()
        .map(|a| {
            let secret = x25519_secret();
            let keys = crate::fleet::store::AgentKeys {
                agent_id: a.to_string(),
                signing_key: SigningKey::generate().public(),
                sealing_key: hex::encode(secret.1),
                activation_id: "act".into(),
            };
            (keys, secret.0)
        })
        .collect();
    for (k, _) in &keys {
        crate::fleet::store::put_agent_keys(&e.db, &e.events, k, &Default::default(), 1)
            .await
            .unwrap();
    }
    let mut req = request(Some(RateRequest::default()));
    req.secrets.insert("token".into(), "s3cret".into());
    let created = e.jobs.submit(req).await.unwrap();
    let env = &e.sent.envelopes("online")[0];
    let drover_protocol::job::Parameter::Secret { sealed } = &env.parameters["token"] else {
        panic!("not sealed: {:?}", env.parameters);
    };
    let aad = drover_protocol::secret::parameter_aad(&created.job_id, "token");
    assert_eq!(keys[0].1.open(sealed, &aad).unwrap(), b"s3cret");
    // Nothing in the store holds the value in the clear.
    let dump: String = {
        let conn = e.db.conn().await;
        let mut stmt = conn
            .prepare("SELECT COALESCE(sealed, '') || COALESCE(CAST(envelope AS TEXT), '') FROM job_targets")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(
        !dump.is_empty(),
        "the sealed secrets and envelopes are kept"
    );
    assert!(!dump.contains("s3cret"));
    e.stop.cancel();
}

/// A sealing key pair as an agent makes one: the private half, and the public bytes.
fn x25519_secret() -> (drover_protocol::secret::AgentSecretKey, [u8; 32]) {
    let k = drover_protocol::secret::AgentSecretKey::generate();
    let public = k.public();
    (k, public)
}
