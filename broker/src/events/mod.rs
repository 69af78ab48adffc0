//! The durable event log: how the job engine and the fleet tell capabilities what
//! happened, without knowing who listens.
//!
//! A producer appends an event in the same transaction as the change it reports (a
//! target's result, an agent coming online), so the log never misses a change and never
//! reports one that was rolled back. Each [`Consumer`] has a cursor in the store, the
//! last event it has handled; a task per consumer hands it the events after its cursor,
//! in order, and moves the cursor only once it has handled them. A consumer is therefore
//! called at least once for every event, also across a crash or a restart, and must
//! handle an event it has seen before as it did the first time.
//!
//! Typed events are defined by their producers (`jobs::events::TargetFinished`,
//! `fleet::Lifecycle`); here an event is a kind and a JSON body.
//!
//! Events every consumer has handled are deleted after [`RETENTION`]. A consumer that
//! appears for the first time starts at the newest event: it does not replay history.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::clock::Clock;
use crate::store::{Db, Tx};

pub mod store;

/// How many events a consumer is handed at once, at most.
const BATCH: usize = 256;
/// How long handled events are kept.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often handled events are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Longest wait for new events before looking anyway (a missed wake-up costs this).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How long a consumer woken by new events lets more gather before it reads them: a
/// burst of results is read in a few batches rather than one by one, and a single
/// result's consumers step aside until the request that made it has its answer.
const LINGER: Duration = Duration::from_millis(10);
/// The longest pause after a consumer fails, before it is handed the events again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A future a consumer returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One event, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its place in the log: increasing.
    pub id: i64,
    /// When it happened, Unix ms (the server's clock).
    pub at_ms: u64,
    /// What happened, such as `job.target_finished` or `agent.online`.
    pub kind: String,
    /// The details, JSON; their type is the producer's.
    pub body: String,
}

impl Event {
    /// The body, as the producer's type.
    pub fn decode<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_str(&self.body)
            .map_err(|e| anyhow::anyhow!("event {} ({}) is unreadable: {e}", self.id, self.kind))
    }
}

/// Something that reacts to events: a capability.
pub trait Consumer: Send + Sync + 'static {
    /// Its name, under which its cursor is kept. Never rename a consumer: it would start
    /// over at the newest event.
    fn name(&self) -> &'static str;

    /// Whether it wants events of `kind`; it is never handed the others.
    fn wants(&self, kind: &str) -> bool;

    /// Handles events, oldest first. On an error the same events come again after a
    /// pause, so handling must be idempotent.
    fn handle<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// Counters, for logs and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events appended by this process.
    pub appended: AtomicU64,
    /// Events handed to consumers (one per consumer per hand-over).
    pub handled: AtomicU64,
    /// Times a consumer failed and got its events again later.
    pub retried: AtomicU64,
    /// Events deleted after every consumer handled them.
    pub pruned: AtomicU64,
}

struct Shared {
    db: Db,
    clock: Clock,
    /// The newest event appended by this process, for consumers to wake on.
    appended: watch::Sender<i64>,
    /// Each running consumer's cursor, as it moves.
    cursors: Mutex<Vec<(&'static str, watch::Receiver<i64>)>>,
    stats: Stats,
}

/// The log's handle; clones share it.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLog")
    }
}

impl EventLog {
    /// The log in `db`.
    pub fn new(db: Db, clock: Clock) -> EventLog {
        let (appended, _) = watch::channel(0);
        EventLog {
            shared: Arc::new(Shared {
                db,
                clock,
                appended,
                cursors: Mutex::new(Vec::new()),
                stats: Stats::default(),
            }),
        }
    }

    /// Appends an event of `kind` in the caller's transaction. Call
    /// [`EventLog::committed`] with the id once the transaction commits.
    pub fn append_in(
        &self,
        tx: &Tx<'_>,
        kind: &str,
        body: &impl Serialize,
        at_ms: u64,
    ) -> anyhow::Result<i64> {
        let id = store::append_in(tx, kind, &serde_json::to_string(body)?, at_ms)?;
        self.shared.stats.appended.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Wakes the consumers: events up to `id` are committed.
    pub fn committed(&self, id: i64) {
        self.shared.appended.send_if_modified(|last| {
            let newer = id > *last;
            if newer {
                *last = id;
            }
            newer
        });
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Starts a task for each consumer, and one that prunes handled events; they end
    /// when `shutdown` is cancelled. A consumer seen for the first time starts at the
    /// newest event.
    pub async fn start(
        &self,
        consumers: Vec<Arc<dyn Consumer>>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<JoinSet<()>> {
        let db = &self.shared.db;
        let mut tasks = JoinSet::new();
        for consumer in consumers {
            let name = consumer.name();
            let cursor = match store::cursor(db, name).await? {
                Some(c) => c,
                None => {
                    let last = store::last_id(db).await?;
                    store::set_cursor(db, name, last, self.shared.clock.now_ms()).await?;
                    tracing::info!(consumer = name, from = last, "new event consumer");
                    last
                }
            };
            let (tx, rx) = watch::channel(cursor);
            self.cursors().push((name, rx));
            let me = self.clone();
            let stop = shutdown.clone();
            tasks.spawn(
                async move { me.feed(consumer, cursor, tx, stop).await }
                    .instrument(tracing::info_span!("consumer", consumer = name)),
            );
        }
        let me = self.clone();
        tasks.spawn(async move { me.prune_while(shutdown).await });
        Ok(tasks)
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, watch::Receiver<i64>)>> {
        self.shared
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every running consumer has handled the event `id` (or moved past
    /// it), at most `timeout`; false if one had not by then.
    pub async fn wait_handled(&self, id: i64, timeout: Duration) -> bool {
        let receivers: Vec<_> = self.cursors().iter().map(|(_, rx)| rx.clone()).collect();
        let all = async {
            for mut rx in receivers {
                if rx.wait_for(|c| *c >= id).await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }

    /// Hands `consumer` the events after `cursor`, for ever.
    async fn feed(
        &self,
        consumer: Arc<dyn Consumer>,
        mut cursor: i64,
        done: watch::Sender<i64>,
        stop: CancellationToken,
    ) {
        let (db, stats) = (&self.shared.db, &self.shared.stats);
        let mut appended = self.shared.appended.subscribe();
        let mut backoff = Duration::from_millis(100);
        let pause = |d: Duration| {
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = stop.cancelled() => false,
                    _ = tokio::time::sleep(d) => true,
                }
            }
        };
        loop {
            if stop.is_cancelled() {
                return;
            }
            let batch = match store::read_after(db, cursor, BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "could not read the event log");
                    if !pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let Some(last) = batch.last().map(|e| e.id) else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = appended.changed() => {
                        if !pause(LINGER).await {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            };
            let wanted: Vec<Event> = batch
                .into_iter()
                .filter(|e| consumer.wants(&e.kind))
                .collect();
            if !wanted.is_empty() {
                if let Err(e) = consumer.handle(&wanted).await {
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        first = wanted[0].id,
                        count = wanted.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "event consumer failed; its events come again"
                    );
                    if !pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                stats
                    .handled
                    .fetch_add(wanted.len() as u64, Ordering::Relaxed);
            }
            backoff = Duration::from_millis(100);
            // A cursor that cannot be saved is saved with a later batch; a crash before
            // then hands these events over again, which consumers must take.
            if let Err(e) =
                store::set_cursor(db, consumer.name(), last, self.shared.clock.now_ms()).await
            {
                tracing::warn!(error = %format!("{e:#}"), "could not save an event cursor");
            }
            cursor = last;
            done.send_replace(cursor);
        }
    }

    /// Deletes events that every consumer has handled, once they are [`RETENTION`] old.
    async fn prune_while(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PRUNE_EVERY) => {}
            }
            let Some(upto) = self.cursors().iter().map(|(_, rx)| *rx.borrow()).min() else {
                continue;
            };
            let before = self
                .shared
                .clock
                .now_ms()
                .saturating_sub(RETENTION.as_millis() as u64);
            match store::prune(&self.shared.db, upto, before).await {
                Ok(0) => {}
                Ok(n) => {
                    self.shared
                        .stats
                        .pruned
                        .fetch_add(n as u64, Ordering::Relaxed);
                    tracing::debug!(pruned = n, "handled events deleted");
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not prune the event log")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
