//! The broker's listeners: our own accept loops feeding mqtt5's per-connection handler.
//!
//! mqtt5's listeners have two faults for a control plane:
//! - its TLS listener runs the TLS handshake inline in its accept loop, with no timeout,
//!   so one idle socket stops every other TLS client from connecting;
//! - a connection that has not sent CONNECT yet ignores the shutdown signal for up to
//!   10 s, and mqtt5 cannot abort it, so it holds shutdown up (and keeps the storage,
//!   with the data directory's lock, alive after it).
//!
//! So we accept connections ourselves, plain and TLS alike: each accepted socket holds
//! one of `max_connections` permits for its whole life (mqtt5 counts a connection only
//! once it has sent CONNECT, so idle sockets would otherwise be unbounded), gets
//! TCP_NODELAY and its own task (in a `JoinSet` we can abort), TLS handshakes are bounded
//! by a timeout, and the (decrypted) stream is handed to mqtt5's public `ClientHandler`,
//! the same handler mqtt5's own listeners use, sharing the broker's router, storage, ACL,
//! stats and resource monitor. The client's real address is kept (no loopback proxy).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use mqtt5::broker::auth::AuthProvider;
use mqtt5::broker::client_handler::ClientHandler;
use mqtt5::broker::config::BrokerConfig as MqttConfig;
use mqtt5::broker::resource_monitor::ResourceMonitor;
use mqtt5::broker::router::MessageRouter;
use mqtt5::broker::storage::DynamicStorage;
use mqtt5::broker::sys_topics::BrokerStats;
use mqtt5::broker::tls_acceptor::TlsStreamWrapper;
use mqtt5::broker::transport::BrokerTransport;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// What every connection's `ClientHandler` shares with the broker.
pub(super) struct Shared {
    pub config: Arc<MqttConfig>,
    pub router: Arc<MessageRouter>,
    pub auth: Arc<dyn AuthProvider>,
    pub storage: Option<Arc<DynamicStorage>>,
    pub stats: Arc<BrokerStats>,
    pub resource_monitor: Arc<ResourceMonitor>,
    /// Set once to stop accepting and to abandon TLS handshakes.
    pub stop: watch::Sender<bool>,
    /// The shutdown notice every `ClientHandler` listens to (it then sends MQTT 5 clients
    /// a DISCONNECT and ends). Must stay open while handlers run: mqtt5 reads a closed
    /// channel as "shut down".
    pub client_shutdown: broadcast::Sender<()>,
    /// One permit per socket held, on every listener: the broker's descriptor budget.
    pub sockets: Arc<Semaphore>,
}

impl Shared {
    /// Stops the accept loops and tells every connected client to leave.
    pub(super) fn stop(&self) {
        // The flag first: a handler subscribes to `client_shutdown`, then checks the flag.
        self.stop.send_replace(true);
        let _ = self.client_shutdown.send(());
    }
}

/// How a listener's connections are wrapped.
#[derive(Clone)]
pub(super) enum Security {
    Plain,
    Tls {
        acceptor: TlsAcceptor,
        handshake_timeout: Duration,
    },
}

impl Security {
    fn name(&self) -> &'static str {
        match self {
            Security::Plain => "TCP",
            Security::Tls { .. } => "TLS",
        }
    }
}

/// A bound listener; accepting once [`Listener::run`] is called.
pub(super) struct Listener {
    pub addr: SocketAddr,
    bound: Option<(TcpListener, Security)>,
    task: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `listen`. Clients can connect at once but wait in the backlog until
    /// [`Listener::run`].
    pub(super) async fn bind(listen: SocketAddr, security: Security) -> anyhow::Result<Listener> {
        let name = security.name();
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the MQTT {name} listener on {listen}"))?;
        let addr = listener.local_addr()?;
        Ok(Listener {
            addr,
            bound: Some((listener, security)),
            task: None,
        })
    }

    /// Starts accepting.
    pub(super) fn run(&mut self, shared: &Arc<Shared>) {
        if let Some((listener, security)) = self.bound.take() {
            tracing::info!(addr = %self.addr, "MQTT {} listener ready", security.name());
            self.task = Some(tokio::spawn(accept_loop(
                listener,
                security,
                Arc::clone(shared),
            )));
        }
    }

    /// Waits until `deadline` for the listener's connections to end once
    /// [`Shared::stop`] was called; whatever is left then is aborted. True if nothing had
    /// to be aborted.
    pub(super) async fn join(mut self, deadline: tokio::time::Instant) -> bool {
        let Some(mut task) = self.task.take() else {
            return true;
        };
        if tokio::time::timeout_at(deadline, &mut task).await.is_ok() {
            return true;
        }
        task.abort();
        let _ = task.await;
        false
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Reads the certificate chain and key; the server config uses ring explicitly.
pub(super) fn load_acceptor(cert_pem: &Path, key_pem: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", cert_pem.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", cert_pem.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", cert_pem.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| anyhow::anyhow!("reading the private key {}: {e}", key_pem.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Resolves once a stop is requested.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn accept_loop(listener: TcpListener, security: Security, shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let mut conns = JoinSet::new();
    let mut refused = 0u64;
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let permit = match Arc::clone(&shared.sockets).try_acquire_owned() {
                        Ok(p) => p,
                        Err(TryAcquireError::NoPermits) => {
                            refused += 1;
                            if refused.is_power_of_two() {
                                tracing::warn!(%peer, refused_total = refused, "MQTT connection refused: every socket of the broker's budget is in use");
                            }
                            continue;
                        }
                        Err(TryAcquireError::Closed) => break,
                    };
                    if let Err(e) = sock.set_nodelay(true) {
                        tracing::debug!(%peer, "setting TCP_NODELAY: {e}");
                    }
                    if !shared.resource_monitor.can_accept_connection(peer.ip()).await {
                        tracing::warn!(%peer, "MQTT connection refused: resource limits reached");
                        continue;
                    }
                    conns.spawn(serve(sock, peer, security.clone(), Arc::clone(&shared), permit));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!("MQTT {} accept failed: {e}", security.name());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn serve(
    sock: TcpStream,
    peer: SocketAddr,
    security: Security,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let transport = match security {
        Security::Plain => BrokerTransport::tcp(sock),
        Security::Tls {
            acceptor,
            handshake_timeout,
        } => {
            let mut stop = shared.stop.subscribe();
            tokio::select! {
                handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(sock)) => {
                    match handshake {
                        Ok(Ok(tls)) => BrokerTransport::tls(TlsStreamWrapper::new(tls)),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                () = stopped(&mut stop) => return,
            }
        }
    };

    let shutdown_rx = shared.client_shutdown.subscribe();
    // Subscribed first, then checked: a shutdown is either seen here or delivered.
    if *shared.stop.borrow() {
        return;
    }
    let handler = ClientHandler::new(
        transport,
        peer,
        Arc::clone(&shared.config),
        Arc::clone(&shared.router),
        Arc::clone(&shared.auth),
        shared.storage.clone(),
        Arc::clone(&shared.stats),
        Arc::clone(&shared.resource_monitor),
        shutdown_rx,
    );
    match handler.run().await {
        Ok(()) => {}
        Err(e) if e.is_normal_disconnect() => tracing::debug!(%peer, "MQTT client left: {e}"),
        Err(e) => tracing::debug!(%peer, "MQTT client handler ended: {e}"),
    }
}
