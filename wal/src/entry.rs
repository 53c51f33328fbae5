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

/// One accepted message, as stored in the WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
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
}
