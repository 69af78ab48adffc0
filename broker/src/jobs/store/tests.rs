use std::collections::HashMap;

use drover_protocol::job::FailureKind;

use super::*;
use crate::clock::Clock;
use crate::jobs::rollout::{Ramp, RatePolicy};
use crate::jobs::types::RolloutSpec;

async fn db() -> (Db, EventLog) {
    let db = Db::in_memory().unwrap();
    db.migrate(&crate::server::SCHEMAS).await.unwrap();
    let events = EventLog::new(db.clone(), Clock::system());
    (db, events)
}

async fn job(db: &Db, id: &str, expires_ms: u64, agents: &[&str]) {
    let job = Job {
        id: id.into(),
        plugin: "p".into(),
        version: 1,
        world: "task".into(),
        targets: "all".into(),
        input: serde_json::Value::Null,
        created_ms: 1,
        expires_ms,
    };
    let rollout = RolloutInfo {
        job_id: id.into(),
        spec: RolloutSpec {
            policy: RatePolicy {
                max_concurrency: None,
                max_errors: None,
                ramp: Ramp::None,
                delivery_timeout_ms: expires_ms,
                run_timeout_ms: 1000,
                send_to_offline: true,
            },
            limits: Default::default(),
            parameters: Default::default(),
            secret_names: Vec::new(),
            rate_controlled: false,
        },
        created_ms: 1,
        cancelled_ms: None,
        done_ms: None,
    };
    let agents: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
    create(db, &job, &agents, &HashMap::new(), &rollout)
        .await
        .unwrap();
}

async fn unanswered(db: &Db, agent: &str, now: u64) -> Vec<(String, Vec<u8>)> {
    unanswered_envelopes(db, agent, now, now).await.unwrap()
}

async fn record(db: &Db, events: &EventLog, r: &JobResult) -> Recorded {
    let judge = crate::jobs::rollout::state_of;
    let one = [Incoming {
        result: r,
        audit: "audit",
    }];
    record_results(db, events, &one, judge, 30)
        .await
        .unwrap()
        .pop()
        .unwrap()
}

#[tokio::test]
async fn sent_envelopes_are_kept_until_their_target_is_answered() {
    let (db, events) = db().await;
    job(&db, "j1", 1_000, &["a", "b", "c", "d"]).await;
    job(&db, "j2", 5_000, &["a"]).await;
    mark_sent(
        &db,
        "j1",
        &[("a", b"env-1a"), ("b", b"env-1b"), ("c", b"env-1c")],
        10,
    )
    .await
    .unwrap();
    mark_sent(&db, "j2", &[("a", b"env-2a")], 10).await.unwrap();

    // Oldest job first; a target never sent (d) has nothing to send again.
    assert_eq!(
        unanswered(&db, "a", 20).await,
        vec![
            ("j1".into(), b"env-1a".to_vec()),
            ("j2".into(), b"env-2a".to_vec())
        ]
    );
    assert!(unanswered(&db, "d", 20).await.is_empty());
    // Sent since the agent came back: it went over the live session.
    assert!(
        unanswered_envelopes(&db, "a", 10, 20)
            .await
            .unwrap()
            .is_empty()
    );
    // An expired job's envelope would be refused as stale: not sent again.
    assert_eq!(
        unanswered(&db, "a", 2_000).await,
        vec![("j2".into(), b"env-2a".to_vec())]
    );

    // Answered in any way (result, started, settled), it is forgotten.
    let r = JobResult::refused("j1", "a", 1, FailureKind::PluginError, "x".into());
    assert!(matches!(
        record(&db, &events, &r).await,
        Recorded::Stored(..)
    ));
    assert!(mark_started(&db, "j1", "b", 30).await.unwrap());
    let settled = settle(&db, &events, "j1", "c", TargetState::TimedOut, "late", 30)
        .await
        .unwrap();
    assert!(settled.is_some());
    assert_eq!(
        unanswered(&db, "a", 40).await,
        vec![("j2".into(), b"env-2a".to_vec())]
    );
    assert!(unanswered(&db, "b", 40).await.is_empty());
    assert!(unanswered(&db, "c", 40).await.is_empty());

    // A cancelled job is never sent again.
    forget_envelopes(&db, "j2").await.unwrap();
    assert!(unanswered(&db, "a", 40).await.is_empty());
}

#[tokio::test]
async fn cancel_requests_are_kept_until_their_target_is_answered() {
    let (db, events) = db().await;
    job(&db, "j1", 1_000, &["a", "b"]).await;
    job(&db, "j2", 1_000, &["a"]).await;
    mark_sent(&db, "j1", &[("a", b"e"), ("b", b"e")], 10)
        .await
        .unwrap();
    mark_sent(&db, "j2", &[("a", b"e")], 10).await.unwrap();
    assert!(mark_started(&db, "j1", "a", 20).await.unwrap());
    for (job, agent) in [("j1", "a"), ("j1", "b"), ("j2", "a")] {
        mark_cancel_sent(&db, job, agent, 30).await.unwrap();
    }
    assert_eq!(unanswered_cancels(&db, "a").await.unwrap(), ["j1", "j2"]);
    assert_eq!(unanswered_cancels(&db, "b").await.unwrap(), ["j1"]);

    let r = JobResult::refused("j1", "a", 1, FailureKind::Cancelled, "x".into());
    assert!(matches!(
        record(&db, &events, &r).await,
        Recorded::Stored(..)
    ));
    settle(
        &db,
        &events,
        "j1",
        "b",
        TargetState::Undeliverable,
        "gone",
        40,
    )
    .await
    .unwrap();
    assert_eq!(unanswered_cancels(&db, "a").await.unwrap(), ["j2"]);
    assert!(unanswered_cancels(&db, "b").await.unwrap().is_empty());
    // A target with its answer is not asked again.
    mark_cancel_sent(&db, "j1", "a", 50).await.unwrap();
    assert_eq!(unanswered_cancels(&db, "a").await.unwrap(), ["j2"]);
}

#[tokio::test]
async fn every_final_state_is_one_event_in_the_same_transaction() {
    let (db, events) = db().await;
    job(&db, "j1", 1_000, &["a", "b"]).await;
    let r = JobResult::refused("j1", "a", 1, FailureKind::PluginError, "boom".into());
    let Recorded::Stored(state, detail, first) = record(&db, &events, &r).await else {
        panic!("not stored");
    };
    assert_eq!(
        (state, detail.as_deref()),
        (TargetState::Failed, Some("boom"))
    );
    // Again: a duplicate, and no second event.
    assert_eq!(record(&db, &events, &r).await, Recorded::Duplicate);
    // Another attempt's result, or another job's: no target.
    let stray = JobResult::refused("j1", "a", 2, FailureKind::PluginError, "x".into());
    assert_eq!(record(&db, &events, &stray).await, Recorded::NoTarget);
    let second = settle(&db, &events, "j1", "b", TargetState::Cancelled, "stop", 40)
        .await
        .unwrap()
        .unwrap();
    // Settling a final target again is not a new event.
    let again = settle(&db, &events, "j1", "b", TargetState::Undeliverable, "x", 50)
        .await
        .unwrap();
    assert_eq!(again, None);

    let log = crate::events::store::read_after(&db, 0, 10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.id).collect::<Vec<_>>(),
        [first, second]
    );
    let bodies: Vec<TargetFinished> = log.iter().map(|e| e.decode().unwrap()).collect();
    assert_eq!(
        (
            bodies[0].agent_id.as_str(),
            bodies[0].state,
            bodies[0].world.as_str()
        ),
        ("a", TargetState::Failed, "task")
    );
    assert_eq!(
        (
            bodies[1].agent_id.as_str(),
            bodies[1].state,
            bodies[1].detail.as_deref()
        ),
        ("b", TargetState::Cancelled, Some("stop"))
    );
}
