//! The API's accept loop: HTTP/1.1 connections served by hyper, within a budget.
//!
//! `axum::serve` runs hyper without a timer, so a connection that never sends (or never
//! finishes) its request headers is kept for ever; enough of them exhaust the process's
//! descriptors, and the API and the broker beside it stop accepting. Here:
//! - request headers must arrive within [`Limits::header_read`], on a new connection and
//!   between requests on a kept-alive one;
//! - the API holds at most [`Limits::max_connections`] connections. At the bound, a new
//!   connection closes the oldest one that is not in the middle of an operator's request
//!   (one that carries an `Authorization` header): idle, half-sent and anonymous
//!   connections give way, so an operator gets in however many sockets an attacker
//!   holds open. If every one is an operator's request in progress, the new connection
//!   is closed instead;
//! - how long a request may take to be answered is the router's (see `api::router`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The API's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at once.
    pub max_connections: usize,
    /// How long a client has to send a request's headers.
    pub header_read: Duration,
}

/// Counters, for logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed to make room for a new one.
    pub evicted: AtomicU64,
    /// New connections closed because every one held was an operator's request.
    pub refused: AtomicU64,
}

/// One connection, as the accept loop sees it.
struct Conn {
    /// Operator requests in progress (until their response body ends).
    busy: AtomicUsize,
    /// Closes the connection at once.
    close: CancellationToken,
}

/// Keeps a connection busy until dropped: with the request's future, then with its
/// response body.
struct Busy(Option<Arc<Conn>>);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its connection busy while it is sent.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router, noting which requests are an operator's.
#[derive(Clone)]
struct Service {
    app: TowerToHyperService<Router>,
    conn: Arc<Conn>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // A wrong token is answered before the body is read, so only an operator's
        // request can stay busy.
        let busy = Busy(req.headers().contains_key(header::AUTHORIZATION).then(|| {
            self.conn.busy.fetch_add(1, Ordering::Relaxed);
            self.conn.clone()
        }));
        let answer = hyper::service::Service::call(&self.app, req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|inner| Tracked { inner, _busy: busy }))
        })
    }
}

/// The connections held, oldest first.
#[derive(Default)]
struct Held {
    next: u64,
    conns: BTreeMap<u64, Arc<Conn>>,
}

impl Held {
    /// Makes room for one more under `max`: closes the oldest connection that is not an
    /// operator's request in progress. False if there is none.
    fn make_room(&mut self, max: usize, stats: &Stats) -> bool {
        if self.conns.len() < max {
            return true;
        }
        let Some(id) = self
            .conns
            .iter()
            .find(|(_, c)| c.busy.load(Ordering::Relaxed) == 0)
            .map(|(id, _)| *id)
        else {
            let n = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                refused_total = n,
                "API connection refused: every connection is an operator's request in progress"
            );
            return false;
        };
        if let Some(c) = self.conns.remove(&id) {
            c.close.cancel();
        }
        let n = stats.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                evicted_total = n,
                max,
                "API at its connection bound: closing the oldest idle connections"
            );
        }
        true
    }
}

/// Serves `app` on `listener` until `shutdown`; then lets requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let stats = Stats::default();
    let held = Arc::new(Mutex::new(Held::default()));
    let mut tasks = JoinSet::new();
    let app = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    loop {
        let (sock, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically out of descriptors: back off instead of spinning.
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            close: CancellationToken::new(),
        });
        let id = {
            let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
            if !h.make_room(limits.max_connections, &stats) {
                continue;
            }
            let id = h.next;
            h.next += 1;
            h.conns.insert(id, conn.clone());
            id
        };
        let _ = sock.set_nodelay(true);
        let service = Service {
            app: app.clone(),
            conn: conn.clone(),
        };
        let serving = http.serve_connection(TokioIo::new(sock), service);
        let (held, shutdown) = (held.clone(), shutdown.clone());
        tasks.spawn(async move {
            let mut serving = std::pin::pin!(serving);
            tokio::select! {
                r = serving.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "API connection ended: {e}");
                    }
                }
                () = conn.close.cancelled() => {}
                () = shutdown.cancelled() => {
                    serving.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = serving.as_mut() => {}
                        () = conn.close.cancelled() => {}
                    }
                }
            }
            held.lock()
                .unwrap_or_else(|e| e.into_inner())
                .conns
                .remove(&id);
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn conn() -> Arc<Conn> {
        Arc::new(Conn {
            busy: AtomicUsize::new(0),
            close: CancellationToken::new(),
        })
    }

    #[test]
    fn room_is_made_by_closing_the_oldest_connection_not_in_an_operators_request() {
        let stats = Stats::default();
        let mut h = Held::default();
        let cs: Vec<Arc<Conn>> = (0..3).map(|_| conn()).collect();
        for (i, c) in cs.iter().enumerate() {
            h.conns.insert(i as u64, c.clone());
        }
        cs[0].busy.store(1, Ordering::Relaxed);
        assert!(h.make_room(4, &stats), "under the bound");
        assert!(h.make_room(3, &stats));
        assert!(!cs[0].close.is_cancelled() && cs[1].close.is_cancelled());
        cs[2].busy.store(1, Ordering::Relaxed);
        assert!(!h.make_room(2, &stats), "every one left is busy");
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn idle_sockets_time_out_and_give_way_to_new_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let limits = Limits {
            max_connections: 4,
            header_read: Duration::from_millis(300),
        };
        let server = tokio::spawn(serve(listener, app, limits, stop.clone()));
        let answer = |s: &mut std::net::TcpStream| {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut b = [0u8; 64];
            let n = s.read(&mut b).unwrap_or(0);
            String::from_utf8_lossy(&b[..n]).to_string()
        };
        tokio::task::spawn_blocking(move || {
            // Twice the bound of idle and half-sent sockets; a new one is still served.
            let mut idle: Vec<std::net::TcpStream> = (0..8)
                .map(|i| {
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    if i % 2 == 0 {
                        s.write_all(b"GET / HTTP/1.1\r\nHost").unwrap();
                    }
                    s
                })
                .collect();
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            assert!(answer(&mut s).starts_with("HTTP/1.1 200"));
            // An idle one left open is closed once its headers are overdue.
            let last = idle.last_mut().unwrap();
            last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(last.read(&mut b).unwrap_or(0), 0, "closed");
        })
        .await
        .unwrap();
        stop.cancel();
        server.await.unwrap();
    }
}
