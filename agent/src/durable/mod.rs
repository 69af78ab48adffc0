//! What the agent keeps on disk so that a crash or a restart loses nothing it promised.
//! Every file is written through `drover_protocol::durable` (or appended and synced).
//!
//! - [`outbox`]: results until the control plane acknowledges them.
//! - [`state`]: the trusted key set, the envelopes seen (replay protection) and the
//!   plugin versions installed (rollback protection).

pub mod outbox;
pub mod state;
