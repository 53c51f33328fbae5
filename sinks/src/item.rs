//! One message as a sink gets it: its log entry (topic, the payload as published, when it
//! was received, its record key, groups and dead-letter reason), with the message decoded
//! only when a sink asks for it. Decoding a payload into a `serde_json::Value` is the
//! largest cost per record on the way to a sink that only copies the body out as JSON
//! ([`fleetbus_protocol::write_json_body`] renders that straight from the payload).

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, TimeZone, Utc};
use fleetbus_protocol::{DecodeError, Message, Topic};
use fleetbus_wal::{DeadLetter, RecordKey, WalEntry};

use crate::SinkError;

/// One message handed to a sink.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its write-ahead log index: increases along a sink's batches, and is the same when a
    /// batch is written again after a failure or a restart.
    pub index: u64,
    /// Its log entry.
    pub entry: Arc<WalEntry>,
    /// The message, once decoded ([`Item::message`]).
    message: OnceLock<Arc<Message>>,
    /// The message body as JSON text (UTF-8), rendered ahead of the write by the worker for a sink
    /// that writes JSON ([`crate::Sink::writes_json`]), on another thread while the batch
    /// before is written. `None`: [`crate::json_line`] renders it when needed.
    pub json: Option<Arc<[u8]>>,
}

impl Item {
    /// The item at log index `index` of `entry`, with its message if it is decoded already.
    pub fn from_entry(index: u64, entry: Arc<WalEntry>, message: Option<Arc<Message>>) -> Item {
        let cell = OnceLock::new();
        if let Some(m) = message {
            let _ = cell.set(m);
        }
        Item {
            index,
            entry,
            message: cell,
            json: None,
        }
    }

    /// The item at log index `index` of `message` as a third party would have published it
    /// (its body as JSON): not a dead letter, its agent's groups unknown.
    pub fn new(index: u64, message: Message) -> Item {
        let entry = WalEntry {
            topic: message.topic.clone(),
            payload: serde_json::to_vec(&message.body).unwrap_or_default(),
            received_ms: message.received.timestamp_millis(),
            sinks: Vec::new(),
            key: record_key(&message),
            dead_letter: None,
            groups: Vec::new(),
            produced: None,
        };
        Item::from_entry(index, Arc::new(entry), Some(Arc::new(message)))
    }

    /// `self` as a dead letter given up by another sink.
    pub fn with_dead_letter(mut self, dead_letter: DeadLetter) -> Item {
        Arc::make_mut(&mut self.entry).dead_letter = Some(dead_letter);
        self
    }

    /// `self` with its agent in `groups` (sorted).
    pub fn with_groups(mut self, groups: Vec<String>) -> Item {
        Arc::make_mut(&mut self.entry).groups = groups;
        self
    }

    /// The message, decoded now if it was not yet. An entry that cannot be decoded is an
    /// encoding error (permanent: the message goes to the dead letter).
    pub fn message(&self) -> Result<&Message, SinkError> {
        if let Some(m) = self.message.get() {
            return Ok(m);
        }
        let decoded = decode_entry(&self.entry)
            .map_err(|e| SinkError::Encode(format!("{}: {e}", self.entry.topic)))?;
        Ok(self.message.get_or_init(|| Arc::new(decoded)))
    }

    /// Set when the message is a dead letter from another sink.
    pub fn dead_letter(&self) -> Option<&DeadLetter> {
        self.entry.dead_letter.as_ref()
    }

    /// The groups its agent belonged to when the message was accepted (sorted; empty when
    /// none were known).
    pub fn groups(&self) -> &[String] {
        &self.entry.groups
    }

    /// When the server received it (the Unix epoch for a time out of range).
    pub fn received(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.entry.received_ms)
            .single()
            .unwrap_or_default()
    }

    /// Appends the message body as JSON ([`fleetbus_protocol::write_json_body`]).
    pub fn write_json_body(&self, out: &mut Vec<u8>) -> Result<(), SinkError> {
        fleetbus_protocol::write_json_body(&self.entry.topic, &self.entry.payload, out)
            .map_err(|e| SinkError::Encode(format!("{}: {e}", self.entry.topic)))
    }
}

/// Decodes the message of a log entry, with its `received` time from the entry.
pub fn decode_entry(entry: &WalEntry) -> Result<Message, DecodeError> {
    let mut message = Message::decode(&entry.topic, &entry.payload)?;
    if let Some(t) = Utc.timestamp_millis_opt(entry.received_ms).single() {
        message.received = t;
    }
    Ok(message)
}

/// The record identity of `message`: its agent, stream, epoch and seq when it is a
/// telemetry record with a sequence number.
pub fn record_key(message: &Message) -> Option<RecordKey> {
    match (Topic::parse(&message.topic), message.seq()) {
        (Topic::Telemetry { agent, stream }, Some(seq)) => Some(RecordKey {
            agent: agent.to_string(),
            stream: stream.to_string(),
            epoch: message.epoch(),
            seq,
        }),
        _ => None,
    }
}
