//! Who may connect to the embedded broker, and as what.

/// The control plane's broker login (and client id).
pub const CONTROL_USER: &str = "drover-control";

/// Who a connected client is, as decided by the authenticator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The control plane: may publish and subscribe anywhere under `drover/v1/`.
    Control,
    /// The agent with this id; the MQTT client id must equal it.
    Agent(String),
}

/// Checks a client's credentials.
pub trait Authenticator: Send + Sync + 'static {
    /// None = refuse the connection.
    ///
    /// Runs on the blocking thread pool, so it may query a database or hash a password.
    /// A returned [`Principal::Agent`] id must satisfy
    /// [`drover_protocol::topics::is_valid_agent_id`], or the connection is refused.
    fn authenticate(&self, client_id: &str, username: &str, password: &[u8]) -> Option<Principal>;
}
