use std::sync::Mutex;

use super::*;

/// Records what it was handed; fails (once) on an event whose body says so, and
/// hangs for ever (a crash, once its task is aborted) on one whose body says `hang`.
struct Recorder {
    name: &'static str,
    seen: Mutex<Vec<(i64, String)>>,
    failed_once: std::sync::atomic::AtomicBool,
}

impl Recorder {
    fn new(name: &'static str) -> Arc<Recorder> {
        Arc::new(Recorder {
            name,
            seen: Mutex::new(Vec::new()),
            failed_once: Default::default(),
        })
    }

    fn seen(&self) -> Vec<(i64, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Consumer for Recorder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn wants(&self, kind: &str) -> bool {
        kind.starts_with("test.")
    }

    fn handle<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for e in events {
                self.seen.lock().unwrap().push((e.id, e.kind.clone()));
                let body: String = e.decode()?;
                if body == "fail" && !self.failed_once.swap(true, Ordering::SeqCst) {
                    anyhow::bail!("asked to fail");
                }
                if body == "hang" {
                    std::future::pending::<()>().await;
                }
            }
            Ok(())
        })
    }
}

async fn append(log: &EventLog, db: &Db, kind: &str, body: &str) -> i64 {
    let tx = db.begin().await.unwrap();
    let id = log.append_in(&tx, kind, &body, 1).unwrap();
    tx.commit().unwrap();
    log.committed(id);
    id
}

fn path(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("drover-events-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("drover.db")
}

async fn open(path: &std::path::Path) -> (Db, EventLog) {
    let db = Db::open(path).unwrap();
    db.migrate(&[store::SCHEMA]).await.unwrap();
    let log = EventLog::new(db.clone(), Clock::system());
    (db, log)
}

#[tokio::test]
async fn each_event_reaches_a_consumer_in_order_and_a_failure_hands_it_over_again() {
    let p = path("order");
    let (db, log) = open(&p).await;
    let rec = Recorder::new("rec");
    let stop = CancellationToken::new();
    let mut tasks = log.start(vec![rec.clone()], stop.clone()).await.unwrap();
    let a = append(&log, &db, "test.a", "ok").await;
    let _other = append(&log, &db, "other.kind", "ok").await;
    let b = append(&log, &db, "test.b", "fail").await;
    let c = append(&log, &db, "test.c", "ok").await;
    assert!(log.wait_handled(c, Duration::from_secs(10)).await);
    // `b` failed once: its batch was handed over again (with whatever was in it), in
    // order; nothing of another kind came.
    let seen = rec.seen();
    let ids: Vec<i64> = seen.iter().map(|(id, _)| *id).collect();
    let mut order = Vec::new();
    for id in &ids {
        if !order.contains(id) {
            order.push(*id);
        }
    }
    assert_eq!(order, [a, b, c], "{seen:?}");
    assert_eq!(ids.iter().filter(|&&i| i == b).count(), 2, "{seen:?}");
    assert_eq!(ids.last(), Some(&c), "{seen:?}");
    assert!(
        ids.windows(2).all(|w| w[0] <= w[1] || w[1] <= b),
        "{seen:?}"
    );
    assert_eq!(log.stats().retried.load(Ordering::Relaxed), 1);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_dir_all(p.parent().unwrap());
}

#[tokio::test]
async fn events_cut_off_by_a_crash_come_again_after_a_restart_and_handled_ones_do_not() {
    let p = path("crash");
    let (db, log) = open(&p).await;
    let rec = Recorder::new("rec");
    let stop = CancellationToken::new();
    let mut tasks = log.start(vec![rec.clone()], stop.clone()).await.unwrap();
    let a = append(&log, &db, "test.a", "ok").await;
    assert!(log.wait_handled(a, Duration::from_secs(10)).await);
    let hang = append(&log, &db, "test.hang", "hang").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The server dies while the consumer handles `hang`: its task is gone, its cursor
    // still before `hang`.
    assert!(!log.wait_handled(hang, Duration::from_millis(100)).await);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop((db, log));

    // A restart: a new process, the same database. A consumer that no longer hangs.
    let (db, log) = open(&p).await;
    let after = Recorder::new("rec");
    after.seen.lock().unwrap().clear();
    struct NoHang(Arc<Recorder>);
    impl Consumer for NoHang {
        fn name(&self) -> &'static str {
            self.0.name
        }
        fn wants(&self, kind: &str) -> bool {
            self.0.wants(kind)
        }
        fn handle<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                for e in events {
                    self.0.seen.lock().unwrap().push((e.id, e.kind.clone()));
                }
                Ok(())
            })
        }
    }
    let stop = CancellationToken::new();
    let mut tasks = log
        .start(vec![Arc::new(NoHang(after.clone()))], stop.clone())
        .await
        .unwrap();
    let d = append(&log, &db, "test.d", "ok").await;
    assert!(log.wait_handled(d, Duration::from_secs(10)).await);
    assert_eq!(
        after.seen(),
        vec![(hang, "test.hang".into()), (d, "test.d".into())]
    );
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_dir_all(p.parent().unwrap());
}

#[tokio::test]
async fn a_new_consumer_starts_at_the_newest_event() {
    let db = Db::in_memory().unwrap();
    db.migrate(&[store::SCHEMA]).await.unwrap();
    let log = EventLog::new(db.clone(), Clock::system());
    let old = append(&log, &db, "test.old", "ok").await;
    let rec = Recorder::new("late");
    let stop = CancellationToken::new();
    let mut tasks = log.start(vec![rec.clone()], stop.clone()).await.unwrap();
    let new = append(&log, &db, "test.new", "ok").await;
    assert!(log.wait_handled(new, Duration::from_secs(10)).await);
    assert_eq!(rec.seen(), vec![(new, "test.new".into())]);
    assert!(old < new);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
}
