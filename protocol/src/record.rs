//! Telemetry records: what an agent publishes on `fleet/{agent}/telemetry/{stream}`.
//!
//! A record is encoded with MessagePack using named fields (`rmp_serde::to_vec_named`), so
//! any field can be added later without breaking old readers. The server also accepts the
//! same structure as JSON from third-party publishers.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One telemetry record: an event, a set of metrics, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The agent that produced the record (its stable id, never its hostname).
    pub agent: String,
    /// The stream within the agent (`metrics`, `events`, `checks`, `heartbeat`, ...).
    pub stream: String,
    /// Per (agent, stream) sequence number: starts at 1, grows by one per record, survives
    /// agent restarts. Gaps mean records were dropped (and reported as an event).
    pub seq: u64,
    /// When the record was produced, in UTC.
    pub ts: DateTime<Utc>,
    /// The agent outbox incarnation that numbered the record: a new random value whenever
    /// an outbox starts from nothing (first start, wiped state), so that sequence numbers
    /// starting again at 1 are not mistaken for duplicates of the old ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Event fields, when the record is an event or a check result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// The check result, on a record of stream `checks` (and on the event a check raises).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::check::CheckResult>,
    /// Measurements carried by the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metric>,
    /// Free-form extra fields (enrichment such as instance metadata, or application data).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, serde_json::Value>,
    /// Tags naming where the record comes from, stamped by the agent on every record: its
    /// cloud identity (`cloud`, `instance_id`, `region`, `role`, ...). Sinks that keep
    /// series (InfluxDB) make them tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl Record {
    /// A record with no event, metrics or fields yet.
    pub fn new(
        agent: impl Into<String>,
        stream: impl Into<String>,
        seq: u64,
        ts: DateTime<Utc>,
    ) -> Self {
        Record {
            agent: agent.into(),
            stream: stream.into(),
            seq,
            ts,
            epoch: None,
            event: None,
            check: None,
            metrics: Vec::new(),
            fields: BTreeMap::new(),
            tags: BTreeMap::new(),
        }
    }

    /// Encodes the record as MessagePack with named fields (the wire format).
    pub fn encode(&self) -> Result<Vec<u8>, crate::EncodeError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Decodes a record from MessagePack or JSON (detected from the first byte).
    pub fn decode(payload: &[u8]) -> Result<Record, crate::DecodeError> {
        crate::message::decode_as(payload)
    }
}

/// Event severity, 1 (lowest, informational) to 5 (highest, critical).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Severity(u8);

impl Severity {
    /// Informational.
    pub const INFO: Severity = Severity(1);
    /// Worth a look.
    pub const NOTICE: Severity = Severity(2);
    /// Something is degraded (a check's WARNING).
    pub const WARNING: Severity = Severity(3);
    /// Something is broken (a check's CRITICAL).
    pub const MAJOR: Severity = Severity(4);
    /// Service is down or data is being lost.
    pub const CRITICAL: Severity = Severity(5);

    /// The numeric level, 1 to 5.
    pub fn level(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for Severity {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        if (1..=5).contains(&v) {
            Ok(Severity(v))
        } else {
            Err(format!("severity must be 1 to 5, got {v}"))
        }
    }
}

impl From<Severity> for u8 {
    fn from(s: Severity) -> u8 {
        s.0
    }
}

/// The event fields operators know from event consoles: duplicates fold by
/// class + source (agent) + rule + resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// What kind of event (e.g. `fleetbus.outbox.overflow`, `disk.full`).
    pub class: String,
    /// 1 (info) to 5 (critical).
    pub severity: Severity,
    /// The rule or check that raised the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The group the event belongs to (e.g. an application or team).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Type-name pairs naming the affected component, outermost first (node/card/port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
    /// Human-readable message text.
    #[serde(default)]
    pub text: String,
    /// A clearing event: it closes the open row with the same class, source, rule and
    /// resources (a check's recovery, a flapping stop) instead of opening one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear: bool,
}

/// One type-name pair of an event's resource path, e.g. `{type: "port", name: "eth0"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// The kind of component (`node`, `card`, `port`, `mount`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The component's name.
    pub name: String,
}

/// One measurement, with the thresholds and range of a Nagios performance datum
/// (`'label'=value[UOM];warn;crit;min;max`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Metric name, dotted (`cpu.usage`, `disk.used`).
    pub name: String,
    /// The measured value; `None` when the source could not determine it (a plugin's `U`).
    #[serde(default)]
    pub value: Option<f64>,
    /// Unit of measure (`%`, `B`, `s`, `c` for counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Warning range (on the wire its text, `~:80` or `@10:20`; a bare number `80`, as
    /// older records carry, reads as `~:80`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<crate::range::Range>,
    /// Critical range, as `warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<crate::range::Range>,
    /// Smallest possible value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest possible value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Dimensions distinguishing series of the same name (`mount`, `iface`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Metric {
    /// A metric with a name, value and unit and nothing else.
    pub fn new(name: impl Into<String>, value: f64, unit: Option<&str>) -> Self {
        Metric {
            name: name.into(),
            value: Some(value),
            unit: unit.map(str::to_string),
            warn: None,
            crit: None,
            min: None,
            max: None,
            labels: BTreeMap::new(),
        }
    }

    /// Adds a label (builder style).
    pub fn label(mut self, key: &str, value: impl Into<String>) -> Self {
        self.labels.insert(key.to_string(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut r = Record::new("a1", "events", 7, Utc::now());
        r.event = Some(Event {
            class: "disk.full".into(),
            severity: Severity::MAJOR,
            rule: Some("check_disk".into()),
            group: None,
            resources: vec![Resource {
                kind: "mount".into(),
                name: "/".into(),
            }],
            text: "95% used".into(),
            clear: false,
        });
        r.metrics
            .push(Metric::new("disk.used", 95.0, Some("%")).label("mount", "/"));
        r
    }

    #[test]
    fn msgpack_round_trip_uses_named_fields() {
        let r = sample();
        let bytes = r.encode().unwrap();
        // named fields: the key text is in the encoding
        assert!(bytes.windows(3).any(|w| w == b"seq"));
        assert_eq!(Record::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn json_from_third_parties_decodes() {
        let r = sample();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(Record::decode(&json).unwrap(), r);
    }

    #[test]
    fn severity_outside_range_is_rejected() {
        let bad = br#"{"agent":"a","stream":"s","seq":1,"ts":"2026-01-01T00:00:00Z","event":{"class":"c","severity":9}}"#;
        let err = Record::decode(bad).unwrap_err().to_string();
        assert!(err.contains("severity must be 1 to 5"), "{err}");
    }
}
