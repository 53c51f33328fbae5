//! A message body as JSON text, written straight from the payload as published (MessagePack
//! from agents, JSON from third parties) without building a `serde_json::Value` first: what
//! the sinks that write JSON send. Decoding into a `Value`, writing it and freeing it costs
//! about three times as much (docs/benchmarks.md), and for a webhook that is most of the
//! server's work per record.
//!
//! The text is the body [`Message::decode`](crate::Message::decode) yields, field for field:
//! on a telemetry topic an object's `agent` and `stream` are the topic's. Those two come
//! first; the other fields keep the order the publisher gave them (a `Value` would have
//! sorted them). A key the publisher repeats is repeated (a `Value` keeps the last one, as
//! JSON parsers do).

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};

use crate::message::{is_json, DecodeError, MAX_DEPTH};
use crate::topics::Topic;

/// Appends the JSON text of the body of `payload`, published on `topic`, to `out` (see the
/// module documentation). On an error `out` is left as it was.
pub fn write_json_body(topic: &str, payload: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    let result = write(topic, payload, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn write(topic: &str, payload: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let identity = match Topic::parse(topic) {
        Topic::Telemetry { agent, stream } => Some((agent, stream)),
        _ => None,
    };
    let Some(&first) = payload.first() else {
        return Err(DecodeError::Empty);
    };
    if is_json(payload) {
        let mut de = serde_json::Deserializer::from_slice(payload);
        let object = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match identity.filter(|_| object) {
            Some((agent, stream)) => with_identity(&mut de, agent, stream, out)?,
            None => {
                serde_transcode::transcode(&mut de, &mut serde_json::Serializer::new(&mut *out))?
            }
        }
        de.end()?;
    } else {
        let mut de = rmp_serde::Deserializer::from_read_ref(payload);
        de.set_max_depth(MAX_DEPTH);
        let msgpack_map = matches!(first, 0x80..=0x8f | 0xde | 0xdf);
        match identity.filter(|_| msgpack_map) {
            Some((agent, stream)) => with_identity(&mut de, agent, stream, out)?,
            None => {
                serde_transcode::transcode(&mut de, &mut serde_json::Serializer::new(&mut *out))
                    // the deserializer's error, carried through the serializer's
                    .map_err(|e| rmp_serde::decode::Error::Syntax(e.to_string()))?
            }
        }
    }
    Ok(())
}

/// Writes the object `de` holds with `agent` and `stream` first, and without the object's
/// own fields of those names.
fn with_identity<'de, D: Deserializer<'de>>(
    de: D,
    agent: &str,
    stream: &str,
    out: &mut Vec<u8>,
) -> Result<(), D::Error> {
    let ser_error = <D::Error as serde::de::Error>::custom;
    let mut ser = serde_json::Serializer::new(out);
    let mut map = ser.serialize_map(None).map_err(ser_error)?;
    map.serialize_entry("agent", agent).map_err(ser_error)?;
    map.serialize_entry("stream", stream).map_err(ser_error)?;
    de.deserialize_map(Fields { map: &mut map })?;
    map.end().map_err(ser_error)
}

/// Copies an object's fields into `map`, leaving out `agent` and `stream`.
struct Fields<'a, M> {
    map: &'a mut M,
}

impl<'de, M: SerializeMap<Error = serde_json::Error>> Visitor<'de> for Fields<'_, M> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        while let Some(kept) = access.next_key_seed(Key {
            map: &mut *self.map,
        })? {
            match kept {
                true => access.next_value_seed(FieldValue {
                    map: &mut *self.map,
                })?,
                false => {
                    access.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// An object's key: written to the map (true), or `agent` or `stream`, left out (false).
struct Key<'a, M> {
    map: &'a mut M,
}

impl<'de, M: SerializeMap<Error = serde_json::Error>> DeserializeSeed<'de> for Key<'_, M> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de, M: SerializeMap<Error = serde_json::Error>> Visitor<'de> for Key<'_, M> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        if key == "agent" || key == "stream" {
            return Ok(false);
        }
        self.map.serialize_key(key).map_err(E::custom)?;
        Ok(true)
    }
}

/// The value of a field kept: transcoded into the map as it is read.
struct FieldValue<'a, M> {
    map: &'a mut M,
}

impl<'de, M: SerializeMap<Error = serde_json::Error>> DeserializeSeed<'de> for FieldValue<'_, M> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        self.map
            .serialize_value(&serde_transcode::Transcoder::new(de))
            .map_err(<D::Error as serde::de::Error>::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Message, Record};
    use serde_json::Value;

    fn render(topic: &str, payload: &[u8]) -> Result<String, DecodeError> {
        let mut out = b"before".to_vec();
        let result = write_json_body(topic, payload, &mut out);
        let text = String::from_utf8(out).unwrap();
        match result {
            Ok(()) => Ok(text.strip_prefix("before").unwrap().to_string()),
            Err(e) => {
                assert_eq!(text, "before", "an error leaves the output as it was");
                Err(e)
            }
        }
    }

    /// The rendered text parses to the body `Message::decode` yields.
    fn same_as_decode(topic: &str, payload: &[u8]) -> String {
        let text = render(topic, payload).unwrap();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            Message::decode(topic, payload).unwrap().body,
            "{text}"
        );
        text
    }

    #[test]
    fn an_agent_record_in_messagepack_is_the_decoded_body_identity_first() {
        let mut record = Record::new("a1", "metrics", 7, chrono::Utc::now());
        record.epoch = Some(u64::MAX);
        record
            .metrics
            .push(crate::Metric::new("cpu", 0.25, Some("%")));
        record
            .fields
            .insert("role".into(), serde_json::json!("web \"front\" é"));
        let text = same_as_decode("fleet/a1/telemetry/metrics", &record.encode().unwrap());
        assert!(
            text.starts_with(r#"{"agent":"a1","stream":"metrics","#),
            "{text}"
        );
    }

    #[test]
    fn a_third_party_json_record_gets_the_topics_identity_and_keeps_its_order() {
        let payload =
            br#" {"z":1,"agent":"spoof","a":[1,2.5,{"b":null}],"stream":"x","s":"\u00e9\n"} "#;
        let text = same_as_decode("fleet/web-1/telemetry/app", payload);
        assert_eq!(
            text,
            r#"{"agent":"web-1","stream":"app","z":1,"a":[1,2.5,{"b":null}],"s":"é\n"}"#
        );
    }

    #[test]
    fn other_topics_and_bodies_that_are_not_objects_are_copied_minified() {
        assert_eq!(
            same_as_decode("ingest/x", b"{ \"agent\" : \"kept\" }"),
            r#"{"agent":"kept"}"#
        );
        assert_eq!(
            same_as_decode("fleet/a/telemetry/s", b"[1, {\"k\": true}]"),
            r#"[1,{"k":true}]"#
        );
        let packed = rmp_serde::to_vec(&(1, "two")).unwrap();
        assert_eq!(
            same_as_decode("fleet/a/telemetry/s", &packed),
            r#"[1,"two"]"#
        );
    }

    #[test]
    fn a_payload_nested_deeper_than_json_allows_is_refused_in_either_encoding() {
        let packed = |depth: usize| {
            let mut p = vec![0x81, 0xa1, b'k']; // {"k": [[[...1...]]]}
            p.extend(std::iter::repeat_n(0x91u8, depth));
            p.push(0x01);
            p
        };
        let json = |depth: usize| format!("{{\"k\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        for depth in [100, 126] {
            same_as_decode("fleet/a/telemetry/s", &packed(depth));
            same_as_decode("fleet/a/telemetry/s", json(depth).as_bytes());
        }
        // far below what a thread's stack holds, even in a debug build
        for depth in [128, 1000, 100_000] {
            for payload in [packed(depth), json(depth).into_bytes()] {
                assert!(Message::decode("fleet/a/telemetry/s", &payload).is_err());
                assert!(render("fleet/a/telemetry/s", &payload).is_err());
            }
        }
    }

    #[test]
    fn a_deep_value_in_a_field_a_typed_message_ignores_is_refused_too() {
        let mut packed = vec![0x81, 0xa1, b'x']; // {"x": [[[...]]]}, no field of a chunk
        packed.extend(std::iter::repeat_n(0x91u8, 5000));
        packed.push(0x01);
        let chunk = crate::message::from_msgpack::<crate::FileChunk<'_>>(&packed);
        assert!(chunk.unwrap_err().to_string().contains("depth"));
    }

    #[test]
    fn what_decode_refuses_is_an_error_and_writes_nothing() {
        for payload in [
            &b""[..],
            b"{not json",
            b"{\"a\":1} trailing",
            b"{\"a\":1",
            &[0xc1, 0x00],
            &[0x81, 0xa1, b'a'], // a map whose value is missing
        ] {
            assert!(
                render("fleet/a/telemetry/s", payload).is_err(),
                "{payload:?}"
            );
            assert!(Message::decode("fleet/a/telemetry/s", payload).is_err());
        }
        assert!(matches!(render("t", b""), Err(DecodeError::Empty)));
        assert!(matches!(
            render("fleet/a/telemetry/s", &[0xc1]),
            Err(DecodeError::MsgPack(_))
        ));
        assert!(matches!(
            render("fleet/a/telemetry/s", b"{\"a\":"),
            Err(DecodeError::Json(_))
        ));
    }
}
