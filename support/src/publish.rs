//! The one handle every service publishes through: acknowledgements (the engine), file
//! replies (the file service), job commands (the job service) and enrollment replies (the
//! enroller) all go to the broker the same way, without waiting.
//!
//! It is a function behind an `Arc`, so the crates that publish (pipeline, jobs, server)
//! need not know the broker: `fleetbus serve` makes one over its in-process broker link,
//! `fleetbus rules run` one over its MQTT client, tests one that records.

use std::sync::Arc;

/// Why a message was not handed on (the broker's queue is full, the link is gone). What it
/// costs is the caller's to say: an agent asks again, re-sends, or reconnects.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotPublished(pub String);

/// Publishes a payload on a topic without waiting. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    send: Arc<SendFn>,
}

/// What a [`Publisher`] calls: topic, payload, and whether the broker keeps the message as
/// the topic's retained one.
type SendFn = dyn Fn(String, Vec<u8>, bool) -> Result<(), NotPublished> + Send + Sync;

impl Publisher {
    /// A publisher that calls `send(topic, payload)`, for a destination without retained
    /// messages (tests, a pipeline without a broker): [`Publisher::publish_retained`]
    /// hands the message on as an ordinary one.
    pub fn new(
        send: impl Fn(String, Vec<u8>) -> Result<(), NotPublished> + Send + Sync + 'static,
    ) -> Publisher {
        Publisher {
            send: Arc::new(move |topic, payload, _retain| send(topic, payload)),
        }
    }

    /// A publisher that calls `send(topic, payload, retain)`: a broker, which keeps the
    /// last message published with `retain` on a topic for later subscribers.
    pub fn with_retain(
        send: impl Fn(String, Vec<u8>, bool) -> Result<(), NotPublished> + Send + Sync + 'static,
    ) -> Publisher {
        Publisher {
            send: Arc::new(send),
        }
    }

    /// A publisher that hands every message to nobody (a pipeline without a broker).
    pub fn discard() -> Publisher {
        Publisher::new(|_, _| Ok(()))
    }

    /// Hands `payload` on for `topic`.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), NotPublished> {
        (self.send)(topic, payload, false)
    }

    /// Hands `payload` on for `topic`, as the topic's retained message when `retain` (see
    /// [`Publisher::with_retain`]).
    pub fn publish_retained(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), NotPublished> {
        (self.send)(topic, payload, retain)
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Publisher")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn a_publisher_hands_on_topic_and_payload_and_says_when_it_could_not() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let publisher = Publisher::new(move |topic, payload| {
            if topic == "full" {
                return Err(NotPublished("queue full".into()));
            }
            record.lock().unwrap().push((topic, payload));
            Ok(())
        });
        publisher.clone().publish("a/b".into(), vec![1]).unwrap();
        let refused = publisher.publish("full".into(), vec![2]).unwrap_err();
        assert_eq!(refused.to_string(), "queue full");
        assert_eq!(*seen.lock().unwrap(), [("a/b".to_string(), vec![1u8])]);
        assert!(Publisher::discard().publish("x".into(), vec![]).is_ok());
    }
}
