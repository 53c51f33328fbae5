//! The decoded message envelope the server routes: a topic and a JSON-shaped body,
//! whatever the publisher's encoding (MessagePack from agents, JSON from third parties).

use chrono::{DateTime, Utc};
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

use crate::topics::Topic;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload has no bytes.
    #[error("empty payload")]
    Empty,
    /// The payload looked like JSON but is not valid JSON of the expected shape.
    #[error("invalid JSON payload: {0}")]
    Json(#[from] serde_json::Error),
    /// The payload is not valid MessagePack of the expected shape.
    #[error("invalid MessagePack payload: {0}")]
    MsgPack(#[from] rmp_serde::decode::Error),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode as MessagePack: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

/// True when the payload is JSON (first non-blank byte `{` or `[`); MessagePack otherwise.
/// The two cannot be confused: a MessagePack record is a map (first byte 0x80-0x8f, 0xde
/// or 0xdf), never `{` (0x7b) or `[` (0x5b).
pub fn is_json(payload: &[u8]) -> bool {
    payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[')
}

/// How deeply a payload's values may nest: serde_json's own limit, which MessagePack gets
/// too (rmp-serde would allow 1,024, and a payload nested that deep overflowed a debug
/// build's 2 MiB thread stack: one hostile message must not crash the server).
pub const MAX_DEPTH: usize = 128;

/// Decodes a MessagePack or JSON payload into `T`. Values nested deeper than [`MAX_DEPTH`]
/// are refused.
pub fn decode_as<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    if is_json(payload) {
        Ok(serde_json::from_slice(payload)?)
    } else {
        Ok(from_msgpack(payload)?)
    }
}

/// Decodes MessagePack into `T`, borrowing from `payload` where `T` does (a file chunk's
/// data). Values nested deeper than [`MAX_DEPTH`] are refused, also in fields `T` ignores.
pub fn from_msgpack<'a, T: Deserialize<'a>>(
    payload: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

/// One message as the rules engine and sinks see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The MQTT topic it was published on.
    pub topic: String,
    /// The decoded payload. For telemetry topics it is an object whose `agent` and `stream`
    /// always equal the topic's (the topic is authoritative: the broker policy ties it to the
    /// publisher's identity).
    pub body: Value,
    /// When the server received it.
    pub received: DateTime<Utc>,
}

impl Message {
    /// Decodes `payload` published on `topic`.
    pub fn decode(topic: &str, payload: &[u8]) -> Result<Message, DecodeError> {
        let mut body: Value = decode_as(payload)?;
        if let Topic::Telemetry { agent, stream } = Topic::parse(topic) {
            if let Value::Object(map) = &mut body {
                if map.get("agent").and_then(Value::as_str) != Some(agent) {
                    map.insert("agent".into(), Value::String(agent.to_string()));
                }
                if map.get("stream").and_then(Value::as_str) != Some(stream) {
                    map.insert("stream".into(), Value::String(stream.to_string()));
                }
            }
        }
        Ok(Message {
            topic: topic.to_string(),
            body,
            received: Utc::now(),
        })
    }

    /// The agent this message belongs to: from the topic, else from the body's `agent`.
    pub fn agent(&self) -> Option<&str> {
        Topic::parse(&self.topic)
            .agent()
            .or_else(|| self.body.get("agent").and_then(Value::as_str))
    }

    /// The telemetry stream: from the topic, else from the body's `stream`.
    pub fn stream(&self) -> Option<&str> {
        Topic::parse(&self.topic)
            .stream()
            .or_else(|| self.body.get("stream").and_then(Value::as_str))
    }

    /// The record's sequence number, if the body carries one.
    pub fn seq(&self) -> Option<u64> {
        self.body.get("seq").and_then(Value::as_u64)
    }

    /// The record's outbox incarnation (0 when it has none, e.g. from a third party).
    pub fn epoch(&self) -> u64 {
        self.body.get("epoch").and_then(Value::as_u64).unwrap_or(0)
    }

    /// The record's own timestamp if it has a valid one, else the time it was received.
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.body
            .get("ts")
            .and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(self.received)
    }

    /// The topic's `/`-separated segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.topic.split('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    #[test]
    fn agent_record_decodes_to_object_with_topic_identity() {
        let r = Record::new("a1", "metrics", 3, Utc::now());
        let m = Message::decode("fleet/a1/telemetry/metrics", &r.encode().unwrap()).unwrap();
        assert_eq!(m.agent(), Some("a1"));
        assert_eq!(m.stream(), Some("metrics"));
        assert_eq!(m.seq(), Some(3));
        assert_eq!(m.timestamp(), r.ts);
    }

    #[test]
    fn third_party_json_gets_identity_from_topic() {
        let m = Message::decode("fleet/x/telemetry/app", br#"{"agent":"spoof","v":1}"#).unwrap();
        assert_eq!(m.body["agent"], "x");
        assert_eq!(m.body["stream"], "app");
        assert_eq!(m.body["v"], 1);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(Message::decode("t", b""), Err(DecodeError::Empty)));
        assert!(Message::decode("t", b"{not json").is_err());
        assert!(Message::decode("t", &[0xc1, 0x00]).is_err());
    }
}
