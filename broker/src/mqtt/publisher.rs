//! How the server publishes: the MQTT link, or in tests anything that records.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use drover_protocol::link::LinkHandle;

/// How sure a message is to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// QoS 1: sent again until the broker has it.
    AtLeastOnce,
    /// QoS 0: for messages whose loss the other side repairs by asking again.
    AtMostOnce,
}

/// A future a publisher returns.
pub type Publishing<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Something that publishes on topics.
pub trait Publisher: Send + Sync + 'static {
    /// Queues `body` on `topic`; returns once it is queued, not when it arrives.
    fn publish(&self, topic: String, body: Vec<u8>, delivery: Delivery) -> Publishing<'_>;
}

/// A shared publisher.
pub type Link = Arc<dyn Publisher>;

impl Publisher for LinkHandle {
    fn publish(&self, topic: String, body: Vec<u8>, delivery: Delivery) -> Publishing<'_> {
        Box::pin(async move {
            match delivery {
                Delivery::AtLeastOnce => LinkHandle::publish(self, topic, body, false).await?,
                Delivery::AtMostOnce => self.publish_at_most_once(topic, body).await?,
            }
            Ok(())
        })
    }
}
