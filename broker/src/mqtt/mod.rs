//! MQTT: the embedded broker, how external brokers are told the same rules, and the
//! one way the server publishes.
//!
//! - [`broker`]: the embedded broker (mqtt5), with our listeners, auth and ACLs.
//! - [`auth`]: who may connect, as what ([`auth::Authenticator`], [`auth::Principal`]).
//! - `acl`: what each principal may publish and subscribe to.
//! - `listener`: our accept loops, TLS handshakes under a timeout.
//! - [`mosquitto`]: Mosquitto's password, ACL and settings files.
//! - [`publisher`]: the server's outgoing messages, behind a trait tests can stand in for.

mod acl;
pub mod auth;
pub mod broker;
mod listener;
pub mod mosquitto;
pub mod publisher;
