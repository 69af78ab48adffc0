//! Authentication glue and topic ACLs for the embedded broker.
//!
//! [`Gate`] is plugged into mqtt5 twice:
//! - as its `AuthProvider`: CONNECT (credentials, client-id binding, the last will),
//!   PUBLISH (topic, also re-checked by mqtt5 when a will is finally published) and
//!   SUBSCRIBE (filter, also re-checked by mqtt5 for every subscription of a resumed
//!   session);
//! - as its `BrokerEventHandler`: mqtt5 does not pass the retain flag to the publish ACL,
//!   so retained publishes are vetted in `on_client_publish`, which may drop a message.
//!
//! A revoked agent ([`Gate::revoke`]) is refused at CONNECT, denied everything else, and
//! its live connection is dropped through mqtt5's router.
//!
//! The principal travels inside mqtt5 as the session's `user_id` (see
//! [`Principal::user_id`]). It is set only by [`Gate`], never by a client, and mqtt5
//! refuses to resume a stored session for a different `user_id`, so a session (and its
//! queued messages) stays bound to the principal that created it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use drover_protocol::topics::{self, Up};
use mqtt5::broker::auth::{AuthProvider, AuthResult};
use mqtt5::broker::events::{
    BrokerEventHandler, ClientConnectEvent, ClientPublishEvent, PublishAction,
};
use mqtt5::broker::router::MessageRouter;
use mqtt5::packet::connect::ConnectPacket;
use mqtt5::packet::publish::PublishPacket;
use mqtt5::protocol::v5::reason_codes::ReasonCode;

use super::auth::{Authenticator, Principal};

/// The `user_id` mqtt5 carries for [`Principal::Control`].
const USER_CONTROL: &str = "control";
/// The `user_id` prefix mqtt5 carries for [`Principal::Agent`].
const USER_AGENT_PREFIX: &str = "agent:";

impl Principal {
    /// How this principal is recorded as mqtt5's `user_id` (and shown to MQTT v5
    /// subscribers as the `x-mqtt-sender` user property, which mqtt5 overwrites on every
    /// publish so a client cannot forge it).
    pub(super) fn user_id(&self) -> String {
        match self {
            Principal::Control => USER_CONTROL.to_string(),
            Principal::Agent(id) => format!("{USER_AGENT_PREFIX}{id}"),
        }
    }

    /// The inverse of [`Principal::user_id`].
    pub(super) fn from_user_id(user_id: &str) -> Option<Principal> {
        if user_id == USER_CONTROL {
            return Some(Principal::Control);
        }
        let id = user_id.strip_prefix(USER_AGENT_PREFIX)?;
        topics::is_valid_agent_id(id).then(|| Principal::Agent(id.to_string()))
    }
}

/// `drover/v1/`: the control plane's whole namespace.
fn root_prefix() -> String {
    format!("{}/", topics::ROOT)
}

/// `drover/v1/agents/{id}/up/`: the only place an agent may publish.
fn agent_up_prefix(id: &str) -> String {
    format!("{}up/", topics::agent_prefix(id))
}

/// `drover/v1/agents/{id}/down/`: every filter an agent subscribes must start with this.
fn agent_down_prefix(id: &str) -> String {
    format!("{}down/", topics::agent_prefix(id))
}

/// May `principal` publish on `topic`?
pub(super) fn may_publish(principal: &Principal, topic: &str) -> bool {
    // Topic names never hold wildcards; mqtt5 validates this too, but the ACL must not
    // depend on it.
    if topic.contains(['+', '#']) {
        return false;
    }
    match principal {
        Principal::Control => topic.starts_with(&root_prefix()),
        Principal::Agent(id) => topic.starts_with(&agent_up_prefix(id)),
    }
}

/// May `principal` publish a *retained* message on `topic` (given it may publish there)?
pub(super) fn may_retain(principal: &Principal, topic: &str) -> bool {
    match principal {
        Principal::Control => may_publish(principal, topic),
        // Presence only: the retained `online`/`offline` status.
        Principal::Agent(id) => topic == topics::up(id, Up::Status),
    }
}

/// May `principal` subscribe to `filter`?
pub(super) fn may_subscribe(principal: &Principal, filter: &str) -> bool {
    match principal {
        Principal::Control => {
            // The control plane may share its subscriptions between replicas.
            let (underlying, _group) = mqtt5::parse_shared_subscription(filter);
            underlying.starts_with(&root_prefix()) || underlying.starts_with("$SYS/")
        }
        // A filter that literally starts with the agent's own `down/` prefix can only
        // match topics under it, whatever wildcards follow. Shared subscriptions
        // (`$share/...`) do not start with it and are refused.
        Principal::Agent(id) => filter.starts_with(&agent_down_prefix(id)),
    }
}

/// The authenticator and ACL that mqtt5 calls; counts what it refuses.
pub(super) struct Gate {
    auth: Arc<dyn Authenticator>,
    denied: AtomicU64,
    /// Agents revoked while the broker runs, and when (see [`Gate::revoke`]).
    revoked: Mutex<HashMap<String, Instant>>,
    /// mqtt5's router, set once the broker exists: it owns the live connections.
    router: OnceLock<Weak<MessageRouter>>,
}

impl Gate {
    pub(super) fn new(auth: Arc<dyn Authenticator>) -> Gate {
        Gate {
            auth,
            denied: AtomicU64::new(0),
            revoked: Mutex::new(HashMap::new()),
            router: OnceLock::new(),
        }
    }

    /// Gives the gate mqtt5's router, so it can drop revoked agents' connections.
    pub(super) fn set_router(&self, router: &Arc<MessageRouter>) {
        let _ = self.router.set(Arc::downgrade(router));
    }

    fn revoked_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.revoked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_revoked(&self, principal: &Principal) -> bool {
        match principal {
            Principal::Control => false,
            Principal::Agent(id) => self.revoked_map().contains_key(id),
        }
    }

    /// Whether agent `id`, whose credential check began at `checked_from`, may connect:
    /// not if it was revoked since. A check that began after the revocation saw the store
    /// without the revoked credential, so it passed with a new one: the revocation is
    /// lifted.
    fn admit(&self, id: &str, checked_from: Instant) -> bool {
        let mut revoked = self.revoked_map();
        match revoked.get(id) {
            Some(&at) if checked_from <= at => false,
            Some(_) => {
                revoked.remove(id);
                tracing::info!(agent.id = id, "MQTT access restored: a new credential");
                true
            }
            None => true,
        }
    }

    /// Revokes agent `id`, whose credential the caller has just deleted: its live
    /// connection (if any) is closed now and its subscriptions dropped; a connection whose
    /// credential check began before now is refused, or dropped if it got registered; until
    /// it connects with a new credential, all its publishes and subscriptions are denied;
    /// and its status topic gets the retained `offline` its will would have published (the
    /// ACL denies the will itself). True if it was connected.
    pub(super) async fn revoke(&self, id: &str) -> bool {
        self.revoked_map().insert(id.to_string(), Instant::now());
        let Some(router) = self.router.get().and_then(Weak::upgrade) else {
            return false;
        };
        let connected = router.is_connected(id).await;
        // Dropping the router's entry closes the connection's takeover channel, which
        // ends its handler: the socket is closed without a DISCONNECT.
        router.unregister_client(id).await;
        let offline = serde_json::to_vec(&drover_protocol::agent::Presence::Offline)
            .expect("presence serialises");
        let mut status =
            PublishPacket::new(topics::up(id, Up::Status), offline, mqtt5::QoS::AtLeastOnce);
        status.retain = true;
        router.route_message(&status, None).await;
        tracing::info!(agent.id = id, connected, "MQTT access revoked");
        connected
    }

    pub(super) fn denied_count(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    fn deny(&self, client_id: &str, principal: Option<&Principal>, action: &str, topic: &str) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            client_id,
            principal = ?principal,
            action,
            topic,
            "MQTT access denied"
        );
    }

    async fn check_connect(&self, connect: &ConnectPacket, peer: SocketAddr) -> AuthResult {
        let client_id = connect.client_id.clone();
        let Some(username) = connect.username.clone() else {
            tracing::info!(client_id, %peer, "MQTT connection without a username refused");
            return AuthResult::fail(ReasonCode::BadUsernameOrPassword);
        };
        let password = connect.password.clone().unwrap_or_default();

        // The authenticator may block (a database, a slow password hash).
        let checked_from = Instant::now();
        let auth = Arc::clone(&self.auth);
        let (cid, user) = (client_id.clone(), username.clone());
        let principal =
            match tokio::task::spawn_blocking(move || auth.authenticate(&cid, &user, &password))
                .await
            {
                Ok(principal) => principal,
                Err(e) => {
                    tracing::error!(client_id, username, "the MQTT authenticator failed: {e}");
                    None
                }
            };
        let Some(principal) = principal else {
            tracing::info!(client_id, username, %peer, "MQTT authentication failed");
            return AuthResult::fail(ReasonCode::BadUsernameOrPassword);
        };

        if let Principal::Agent(id) = &principal {
            if !topics::is_valid_agent_id(id) {
                tracing::error!(
                    client_id,
                    username,
                    agent_id = id,
                    "the authenticator returned an invalid agent id; connection refused"
                );
                return AuthResult::fail(ReasonCode::NotAuthorized);
            }
            // Bind the client id to the credential: an agent cannot take over (or read
            // the queued messages of) another client's session.
            if client_id != *id {
                self.deny(&client_id, Some(&principal), "connect", "");
                return AuthResult::fail(ReasonCode::NotAuthorized);
            }
            if !self.admit(id, checked_from) {
                self.deny(&client_id, Some(&principal), "connect (revoked)", "");
                return AuthResult::fail(ReasonCode::NotAuthorized);
            }
        }

        if let Some(will) = &connect.will {
            let allowed = may_publish(&principal, &will.topic)
                && (!will.retain || may_retain(&principal, &will.topic));
            if !allowed {
                let action = if will.retain {
                    "will (retained)"
                } else {
                    "will"
                };
                self.deny(&client_id, Some(&principal), action, &will.topic);
                return AuthResult::fail(ReasonCode::NotAuthorized);
            }
        }

        tracing::debug!(client_id, principal = ?principal, %peer, "MQTT client authenticated");
        AuthResult::success_with_user(principal.user_id())
    }
}

impl AuthProvider for Gate {
    fn authenticate<'a>(
        &'a self,
        connect: &'a ConnectPacket,
        client_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = mqtt5::Result<AuthResult>> + Send + 'a>> {
        Box::pin(async move { Ok(self.check_connect(connect, client_addr).await) })
    }

    fn authorize_publish<'a>(
        &'a self,
        client_id: &str,
        user_id: Option<&'a str>,
        topic: &'a str,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        let principal = user_id.and_then(Principal::from_user_id);
        let allowed = principal
            .as_ref()
            .is_some_and(|p| !self.is_revoked(p) && may_publish(p, topic));
        if !allowed {
            self.deny(client_id, principal.as_ref(), "publish", topic);
        }
        Box::pin(std::future::ready(allowed))
    }

    fn authorize_subscribe<'a>(
        &'a self,
        client_id: &str,
        user_id: Option<&'a str>,
        topic_filter: &'a str,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        let principal = user_id.and_then(Principal::from_user_id);
        let allowed = principal
            .as_ref()
            .is_some_and(|p| !self.is_revoked(p) && may_subscribe(p, topic_filter));
        if !allowed {
            self.deny(client_id, principal.as_ref(), "subscribe", topic_filter);
        }
        Box::pin(std::future::ready(allowed))
    }
}

impl BrokerEventHandler for Gate {
    fn on_client_connect<'a>(
        &'a self,
        event: ClientConnectEvent,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            // Authenticated before a revocation, registered after it: drop it now.
            let principal = event.user_id.as_deref().and_then(Principal::from_user_id);
            if principal.as_ref().is_some_and(|p| self.is_revoked(p))
                && let Some(router) = self.router.get().and_then(Weak::upgrade)
            {
                self.deny(
                    &event.client_id,
                    principal.as_ref(),
                    "connected (revoked)",
                    "",
                );
                router.unregister_client(&event.client_id).await;
            }
        })
    }

    fn on_client_publish<'a>(
        &'a self,
        event: ClientPublishEvent,
    ) -> Pin<Box<dyn Future<Output = PublishAction> + Send + 'a>> {
        let mut action = PublishAction::Continue;
        if event.retain {
            let principal = event.user_id.as_deref().and_then(Principal::from_user_id);
            if !principal
                .as_ref()
                .is_some_and(|p| may_retain(p, &event.topic))
            {
                self.deny(
                    &event.client_id,
                    principal.as_ref(),
                    "publish (retained)",
                    &event.topic,
                );
                // Acknowledged to the client (mqtt5 completes the QoS handshake) but
                // neither routed nor retained.
                action = PublishAction::Handled;
            }
        }
        Box::pin(std::future::ready(action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::topics::{Down, UP_FILTER};

    fn agent(id: &str) -> Principal {
        Principal::Agent(id.to_string())
    }

    #[test]
    fn user_id_round_trips() {
        for p in [Principal::Control, agent("web-1")] {
            assert_eq!(Principal::from_user_id(&p.user_id()), Some(p));
        }
        assert_eq!(Principal::from_user_id("agent:+"), None);
        assert_eq!(Principal::from_user_id("agent:"), None);
        assert_eq!(Principal::from_user_id("web-1"), None);
    }

    #[test]
    fn agent_publish_rules() {
        let a = agent("a");
        assert!(may_publish(&a, &topics::up("a", Up::Result)));
        assert!(may_publish(&a, &topics::up("a", Up::Status)));
        assert!(!may_publish(&a, &topics::up("b", Up::Result)));
        assert!(!may_publish(&a, &topics::down("a", Down::Job)));
        assert!(!may_publish(&a, "drover/v1/agents/a/upx"));
        assert!(!may_publish(&a, "other/topic"));
        assert!(!may_publish(&a, "drover/v1/agents/a/up/+"));
    }

    #[test]
    fn agent_retain_rules() {
        let a = agent("a");
        assert!(may_retain(&a, &topics::up("a", Up::Status)));
        assert!(!may_retain(&a, &topics::up("a", Up::Hello)));
        assert!(!may_retain(&a, &topics::up("b", Up::Status)));
        assert!(may_retain(
            &Principal::Control,
            &topics::down("a", Down::Ack)
        ));
        assert!(!may_retain(&Principal::Control, "elsewhere"));
    }

    #[test]
    fn agent_subscribe_rules() {
        let a = agent("a");
        assert!(may_subscribe(&a, &topics::down_filter("a")));
        assert!(may_subscribe(&a, "drover/v1/agents/a/down/job"));
        assert!(may_subscribe(&a, "drover/v1/agents/a/down/+"));
        for f in [
            "#",
            "+/#",
            "drover/#",
            "drover/v1/#",
            "drover/v1/agents/+/down/#",
            "drover/v1/agents/a/#",
            "drover/v1/agents/a/+/#",
            "drover/v1/agents/a/up/#",
            "$share/g/drover/v1/agents/a/down/#",
            "$SYS/#",
            &topics::down_filter("b"),
        ] {
            assert!(!may_subscribe(&a, f), "{f} allowed");
        }
    }

    #[test]
    fn control_rules() {
        let c = Principal::Control;
        assert!(may_subscribe(&c, UP_FILTER));
        assert!(may_subscribe(&c, "drover/v1/#"));
        assert!(may_subscribe(&c, "$SYS/#"));
        assert!(may_subscribe(&c, "$share/ctl/drover/v1/agents/+/up/#"));
        assert!(!may_subscribe(&c, "#"));
        assert!(!may_subscribe(&c, "drover/#"));
        assert!(!may_subscribe(&c, "$share/ctl/#"));
        assert!(may_publish(&c, &topics::down("x", Down::Job)));
        assert!(!may_publish(&c, "$SYS/broker/x"));
        assert!(!may_publish(&c, "elsewhere"));
    }
}
