//! Network grants: the TCP addresses a plugin's sockets may reach.
//!
//! A plugin has no sockets unless granted `host:port` addresses. With a grant, TCP is
//! enabled and every socket operation passes [`NetGrant::permits`]: connecting only to a
//! granted address (names are resolved once, when the run starts), binding only the
//! implicit wildcard address a `connect` needs, never listening or accepting. UDP stays
//! off. Name lookup is enabled only when a granted address is a name; it cannot be limited
//! to those names, but what it resolves can only be connected to if granted.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::manifest::{NetAddr, NetHost};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::sockets::SocketAddrUse;

/// The addresses a run may connect to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetGrant {
    /// Granted addresses, names resolved, IPs in canonical form.
    allowed: HashSet<SocketAddr>,
    /// Whether any granted address was a name.
    names: bool,
}

impl NetGrant {
    /// Resolves the granted `host:port` entries, each name within `lookup_timeout`. A name
    /// that does not resolve grants nothing, with a warning in the log.
    pub async fn resolve(granted: &[String], lookup_timeout: Duration) -> NetGrant {
        let mut grant = NetGrant::default();
        for entry in granted {
            let Ok(addr) = entry.parse::<NetAddr>() else {
                // Manifests are validated before this; an unparsable entry grants nothing.
                tracing::warn!(address = %entry, "ignoring invalid network grant");
                continue;
            };
            match &addr.host {
                NetHost::Ip(ip) => {
                    grant
                        .allowed
                        .insert(SocketAddr::new(ip.to_canonical(), addr.port));
                }
                NetHost::Name(name) => {
                    grant.names = true;
                    let lookup = tokio::net::lookup_host((name.as_str(), addr.port));
                    match tokio::time::timeout(lookup_timeout, lookup).await {
                        Ok(Ok(found)) => grant.allowed.extend(
                            found.map(|sa| SocketAddr::new(sa.ip().to_canonical(), sa.port())),
                        ),
                        Ok(Err(e)) => {
                            tracing::warn!(address = %addr, error = %e, "granted name does not resolve")
                        }
                        Err(_) => {
                            tracing::warn!(address = %addr, "granted name did not resolve in time")
                        }
                    }
                }
            }
        }
        grant
    }

    /// Whether a socket may use `addr` for `what`.
    pub fn permits(&self, addr: SocketAddr, what: SocketAddrUse) -> bool {
        match what {
            SocketAddrUse::TcpConnect => self
                .allowed
                .contains(&SocketAddr::new(addr.ip().to_canonical(), addr.port())),
            // The check `connect` makes for its implicit bind: any local IP, any port.
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
            _ => false,
        }
    }

    /// Enables TCP in a WASI context, limited to this grant. Call it only for a run
    /// granted some address: without it, a context has no sockets at all.
    pub fn apply(self, wasi: &mut WasiCtxBuilder) {
        wasi.allow_tcp(true)
            .allow_udp(false)
            .allow_ip_name_lookup(self.names);
        let grant = Arc::new(self);
        wasi.socket_addr_check(move |addr, what| {
            let ok = grant.permits(addr, what);
            Box::pin(async move { ok })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn only_granted_addresses_may_be_connected_to() {
        let grant = NetGrant::resolve(
            &[
                "127.0.0.1:8080".into(),
                "[::1]:443".into(),
                "localhost:9000".into(),
            ],
            Duration::from_secs(5),
        )
        .await;
        assert!(grant.names);
        use SocketAddrUse::*;
        assert!(grant.permits(sa("127.0.0.1:8080"), TcpConnect));
        assert!(grant.permits(sa("[::1]:443"), TcpConnect));
        assert!(grant.permits(sa("[::ffff:127.0.0.1]:8080"), TcpConnect));
        // `localhost` resolves to loopback, on the granted port only.
        assert!(grant.permits(sa("127.0.0.1:9000"), TcpConnect));
        for (addr, what) in [
            ("127.0.0.1:8081", TcpConnect),
            ("127.0.0.2:8080", TcpConnect),
            ("10.0.0.1:8080", TcpConnect),
            ("127.0.0.1:9001", TcpConnect),
            ("127.0.0.1:8080", TcpListen),
            ("127.0.0.1:8080", TcpAccept),
            ("127.0.0.1:8080", TcpBind),
            ("0.0.0.0:8080", TcpBind),
            ("127.0.0.1:8080", UdpSend),
            ("127.0.0.1:8080", UdpReceive),
            ("0.0.0.0:0", UdpBind),
        ] {
            assert!(!grant.permits(sa(addr), what), "{addr} {what:?} permitted");
        }
        assert!(grant.permits(sa("0.0.0.0:0"), TcpBind));
        assert!(grant.permits(sa("[::]:0"), TcpBind));

        let ips = NetGrant::resolve(&["127.0.0.1:1".into()], Duration::from_secs(1)).await;
        assert!(!ips.names);
        assert!(
            !NetGrant::default().permits(sa("127.0.0.1:1"), TcpConnect),
            "an empty grant permits nothing"
        );
    }
}
