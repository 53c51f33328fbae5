//! One WAL entry.

use serde::{Deserialize, Serialize};

use crate::WalError;

/// The identity of a telemetry record, for de-duplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordKey {
    /// The agent.
    pub agent: String,
    /// The stream.
    pub stream: String,
    /// The agent's outbox incarnation (0 if the record has none).
    pub epoch: u64,
    /// The sequence number.
    pub seq: u64,
}

/// Why an entry is a dead letter: which sink gave it up, and the last error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The sink that could not write it.
    pub sink: String,
    /// The last error.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was given up (Unix milliseconds).
    pub failed_at_ms: i64,
}

/// Where a message a rule made came from: the rule, and which of the messages it made of
/// one input this is (0, 1, ... in order; a `foreach` makes one per item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Produced {
    /// The rule's name.
    pub rule: String,
    /// Its place among the messages the rule made of one input.
    pub part: u32,
}

/// One accepted message, as stored in the WAL.
///
/// One input can be several entries in a row (each message a rule's transforms made, and
/// the input itself for the sinks that take it as published); only the last of them
/// carries the input's [`WalEntry::key`], so that an input is known as accepted (a
/// duplicate when sent again) only once all its entries are in the log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WalEntry {
    /// The MQTT topic.
    pub topic: String,
    /// The payload exactly as published.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// When the server received it (Unix milliseconds).
    pub received_ms: i64,
    /// The names of the sinks it goes to.
    pub sinks: Vec<String>,
    /// Its record identity, when it is a sequenced telemetry record.
    pub key: Option<RecordKey>,
    /// Set when this entry is a dead letter for the sinks named in `sinks`.
    pub dead_letter: Option<DeadLetter>,
    /// The groups its agent belonged to when it was accepted (sorted; empty when the
    /// server knew none). Last, and left out when empty, so that entries written before
    /// it existed decode (as no groups).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Set when a rule's transforms made this message (its payload is the result, as
    /// JSON). Last, and left out when `None`, as `groups`.
    #[serde(default)]
    pub produced: Option<Produced>,
}

impl Serialize for WalEntry {
    /// Positional, with the trailing fields left out while they are empty, so that an
    /// entry without them is encoded as before they existed (and older logs decode).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let len = match (&self.produced, self.groups.is_empty()) {
            (Some(_), _) => 8,
            (None, false) => 7,
            (None, true) => 6,
        };
        let mut t = serializer.serialize_tuple(len)?;
        t.serialize_element(&self.topic)?;
        t.serialize_element(serde_bytes::Bytes::new(&self.payload))?;
        t.serialize_element(&self.received_ms)?;
        t.serialize_element(&self.sinks)?;
        t.serialize_element(&self.key)?;
        t.serialize_element(&self.dead_letter)?;
        if len > 6 {
            t.serialize_element(&self.groups)?;
        }
        if let Some(p) = &self.produced {
            t.serialize_element(p)?;
        }
        t.end()
    }
}

impl WalEntry {
    /// Compact MessagePack (positional fields: the WAL is internal and versioned with the
    /// binary).
    pub fn encode(&self) -> Result<Vec<u8>, WalError> {
        rmp_serde::to_vec(self).map_err(|e| WalError::Encode(e.to_string()))
    }

    /// Decodes an entry read from the log.
    pub fn decode(bytes: &[u8]) -> Result<WalEntry, WalError> {
        rmp_serde::from_slice(bytes).map_err(|e| WalError::Decode(e.to_string()))
    }

    /// True when the entry goes to sink `name`.
    pub fn goes_to(&self, name: &str) -> bool {
        self.sinks.iter().any(|s| s == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(groups: &[&str]) -> WalEntry {
        WalEntry {
            topic: "fleet/web-01/telemetry/metrics".into(),
            payload: b"{}".to_vec(),
            received_ms: 7,
            sinks: vec!["influx".into()],
            key: None,
            dead_letter: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            produced: None,
        }
    }

    #[test]
    fn an_entry_without_groups_is_encoded_as_before_groups_existed() {
        // the layout of the logs written before: six positional fields
        let old = rmp_serde::to_vec(&(
            "fleet/web-01/telemetry/metrics",
            serde_bytes::Bytes::new(b"{}"),
            7i64,
            vec!["influx"],
            None::<RecordKey>,
            None::<DeadLetter>,
        ))
        .unwrap();
        let new = entry(&[]).encode().unwrap();
        assert_eq!(new, old);
        assert_eq!(WalEntry::decode(&old).unwrap(), entry(&[]));
    }

    #[test]
    fn groups_survive_the_log() {
        let e = entry(&["linux", "web"]);
        assert_eq!(WalEntry::decode(&e.encode().unwrap()).unwrap(), e);
    }

    #[test]
    fn a_produced_message_survives_the_log_with_or_without_groups() {
        for groups in [&[][..], &["web"][..]] {
            let mut e = entry(groups);
            e.produced = Some(Produced {
                rule: "points".into(),
                part: 3,
            });
            assert_eq!(WalEntry::decode(&e.encode().unwrap()).unwrap(), e);
        }
    }
}
