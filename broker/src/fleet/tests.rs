//! The fleet's store with a real SQLite: who an open activation may enroll, which hellos
//! and heartbeats are taken, and how far an agent's event log grows.

use std::collections::BTreeMap;

use drover_protocol::agent::Hello;
use drover_protocol::keys::SigningKey;

use super::credentials::BrokerAuth;
use super::store::{self, AgentKeys, Enrolled, Fresh};
use crate::clock::Clock;
use crate::events::EventLog;
use crate::store::Db;

async fn db() -> (Db, EventLog) {
    let db = Db::in_memory().unwrap();
    db.migrate(&crate::server::SCHEMAS).await.unwrap();
    let events = EventLog::new(db.clone(), Clock::system());
    (db, events)
}

fn keys(agent: &str, activation: &str) -> AgentKeys {
    AgentKeys {
        agent_id: agent.into(),
        signing_key: SigningKey::generate().public(),
        sealing_key: "00".repeat(32),
        activation_id: activation.into(),
    }
}

async fn activation(db: &Db, agent: Option<&str>, tags: &[(&str, &str)]) -> String {
    let tags: BTreeMap<String, String> = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    super::enrollment::create_activation(db, u64::MAX, 5, tags, agent.map(Into::into), 1)
        .await
        .unwrap()
        .activation
        .id
}

#[tokio::test]
async fn an_open_activation_enrolls_only_ids_the_server_does_not_know() {
    let (db, events) = db().await;
    let open = activation(&db, None, &[("env", "dev")]).await;
    let (_, fresh) = BrokerAuth::mint("fresh-1").unwrap();

    // Added by an operator (a credential) and not enrolled: not the open activation's.
    BrokerAuth::create_agent(&db, "added-1", 1).await.unwrap();
    let before = store::broker_user(&db, "added-1").await.unwrap().unwrap();
    let k = keys("added-1", &open);
    let r = store::enroll(&db, &events, &k, &BTreeMap::new(), true, Some(&fresh), 2).await;
    assert_eq!(r.unwrap(), Enrolled::Known);
    let after = store::broker_user(&db, "added-1").await.unwrap().unwrap();
    assert_eq!(before.hash, after.hash, "the credential was replaced");
    assert!(store::agent_keys(&db, "added-1").await.unwrap().is_none());
    let uses = |db: Db| async move { store::activations(&db).await.unwrap()[0].uses };
    assert_eq!(uses(db.clone()).await, 0);

    // Seen (a row) only: known too.
    store::record_presence(&db, &events, "seen-1", true, 3)
        .await
        .unwrap();
    let r = store::enroll(
        &db,
        &events,
        &keys("seen-1", &open),
        &BTreeMap::new(),
        true,
        Some(&fresh),
        3,
    )
    .await
    .unwrap();
    assert_eq!(r, Enrolled::Known);

    // A new id: enrolled, with its credential and the activation's tags.
    let tags = BTreeMap::from([("env".to_string(), "dev".to_string())]);
    let r = store::enroll(
        &db,
        &events,
        &keys("fresh-1", &open),
        &tags,
        true,
        Some(&fresh),
        4,
    )
    .await
    .unwrap();
    assert!(matches!(
        r,
        Enrolled::Done {
            credential: true,
            ..
        }
    ));
    let row = store::agent(&db, "fresh-1").await.unwrap().unwrap();
    assert_eq!(row.tags, tags);
    assert!(!row.online);
    // ... and never again through an open activation.
    let r = store::enroll(
        &db,
        &events,
        &keys("fresh-1", &open),
        &tags,
        true,
        Some(&fresh),
        5,
    )
    .await
    .unwrap();
    assert_eq!(r, Enrolled::Known);

    // A bound activation enrolls its id, keeping the credential minted beside it.
    let bound = activation(&db, Some("added-1"), &[("env", "prod")]).await;
    let (_, other) = BrokerAuth::mint("added-1").unwrap();
    let r = store::enroll(
        &db,
        &events,
        &keys("added-1", &bound),
        &BTreeMap::new(),
        false,
        Some(&other),
        6,
    )
    .await
    .unwrap();
    assert!(matches!(
        r,
        Enrolled::Done {
            credential: false,
            ..
        }
    ));
    let kept = store::broker_user(&db, "added-1").await.unwrap().unwrap();
    assert_eq!(kept.hash, before.hash);
}

fn hello(sent_at_ms: u64, host: &str, labels: &[(&str, &str)]) -> Hello {
    Hello {
        agent_id: "a-1".into(),
        hostname: host.into(),
        os: "linux".into(),
        os_version: String::new(),
        arch: String::new(),
        agent_version: String::new(),
        tags: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        started_at_ms: 0,
        keyset_version: 1,
        sent_at_ms,
    }
}

#[tokio::test]
async fn hellos_and_heartbeats_are_taken_only_when_newer_and_never_change_tags() {
    let (db, events) = db().await;
    let h = hello(1_000, "new", &[("env", "prod")]);
    assert!(matches!(
        store::record_hello(&db, &events, &h, 10).await.unwrap(),
        Fresh::Taken(_)
    ));
    let set = BTreeMap::from([("env".to_string(), "dev".to_string())]);
    store::retag(&db, "a-1", &set, &[]).await.unwrap().unwrap();
    // The same one again, and an older one: refused, and nothing changes.
    let old = hello(999, "old", &[("env", "old")]);
    for h in [&h, &old] {
        assert_eq!(
            store::record_hello(&db, &events, h, 20).await.unwrap(),
            Fresh::NotNewer { last_ms: 1_000 }
        );
    }
    let row = store::agent(&db, "a-1").await.unwrap().unwrap();
    assert_eq!(row.hostname, "new");
    assert_eq!(row.labels["env"], "prod");
    assert_eq!(row.tags, set, "a hello changed the tags");

    assert_eq!(
        store::record_heartbeat(&db, "a-1", 5_000, 30)
            .await
            .unwrap(),
        Fresh::Taken(())
    );
    assert_eq!(
        store::record_heartbeat(&db, "a-1", 5_000, 40)
            .await
            .unwrap(),
        Fresh::NotNewer { last_ms: 5_000 }
    );
    assert_eq!(
        store::agent(&db, "a-1")
            .await
            .unwrap()
            .unwrap()
            .last_seen_ms,
        30
    );
    // Removing a tag, and an unknown agent.
    let tags = store::retag(&db, "a-1", &BTreeMap::new(), &["env".into()])
        .await
        .unwrap()
        .unwrap();
    assert!(tags.is_empty());
    assert!(
        store::retag(&db, "nobody", &set, &[])
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn each_agent_keeps_its_newest_events_and_the_log_says_what_it_dropped() {
    let (db, _) = db().await;
    let kept = store::EVENTS_KEPT_PER_AGENT;
    store::add_agent_event(&db, "other", "forged", "kept", 1)
        .await
        .unwrap();
    let mut deleted = 0;
    for i in 0..(kept + 150) {
        deleted += store::add_agent_event(&db, "noisy", "bad-message", &format!("#{i}"), 2)
            .await
            .unwrap();
    }
    let noisy = store::agent_events(&db, Some("noisy"), 10 * kept)
        .await
        .unwrap();
    assert!(noisy.len() as u32 <= kept, "{} kept", noisy.len());
    // Every event inserted is kept or counted, besides the notices.
    assert!(deleted as usize + noisy.len() > (kept + 150) as usize);
    let notice = noisy.iter().find(|e| e.kind == "dropped").unwrap();
    assert!(
        notice.message.contains("older events"),
        "{}",
        notice.message
    );
    // The newest is there; another agent's events are untouched.
    assert_eq!(noisy.last().unwrap().message, format!("#{}", kept + 149));
    assert_eq!(
        store::agent_events(&db, Some("other"), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}
