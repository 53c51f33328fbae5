//! End-to-end acknowledgements: the server tells an agent which of its records are stored
//! durably (in the server's write-ahead log), on `fleet/{agent}/acks`.
//!
//! Each names the store that holds the records (`store`); an agent trusts only the store
//! it is configured to deliver to (`connection.store`, `server` by default).
//!
//! Acknowledgements are *selective*: per stream, the ranges of sequence numbers made
//! durable since the last acknowledgement (re-sent duplicates included). An agent removes
//! exactly those records from its outbox. Acknowledgements are idempotent, so they may be
//! lost or repeated (the server publishes them at QoS 0): a record whose acknowledgement
//! never arrives is sent again after a timeout, recognised as a duplicate, and acknowledged
//! again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The store name of `fleetbus serve`'s write-ahead log: what agents deliver to unless
/// configured otherwise (`connection.store`).
pub const SERVER_STORE: &str = "server";

/// One acknowledgement message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The durable store that holds these records: [`SERVER_STORE`] for `fleetbus serve`,
    /// the `--store` name of a `fleetbus rules run` worker. An agent removes records only
    /// on acknowledgements from the store it delivers to: another engine on the same
    /// broker (a worker archiving a copy) storing a record does not mean *its* store has
    /// it.
    #[serde(default)]
    pub store: String,
    /// Per stream: the outbox incarnation the ranges belong to, and the ranges.
    pub streams: BTreeMap<String, StreamAck>,
}

/// The acknowledged sequence numbers of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAck {
    /// The agent outbox incarnation (the record's `epoch`; 0 when the records had none).
    pub epoch: u64,
    /// Inclusive ranges `[first, last]` of durable sequence numbers, ascending.
    pub ranges: Vec<(u64, u64)>,
}

impl Ack {
    /// Encodes as MessagePack with named fields.
    pub fn encode(&self) -> Result<Vec<u8>, crate::EncodeError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Decodes from MessagePack or JSON.
    pub fn decode(payload: &[u8]) -> Result<Ack, crate::DecodeError> {
        crate::message::decode_as(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut a = Ack::default();
        a.streams.insert(
            "metrics".into(),
            StreamAck {
                epoch: 7,
                ranges: vec![(1, 10), (12, 12)],
            },
        );
        assert_eq!(Ack::decode(&a.encode().unwrap()).unwrap(), a);
    }
}
