//! `aggregate`: tumbling windows per key, each emitting one roll-up message when it
//! closes. For per-minute roll-ups kept for the long term:
//!
//! ```toml
//! [[rules]]
//! name = "cpu-per-minute"
//! from = ["fleet/+/telemetry/metrics"]
//! foreach = "record.metrics"
//! where = 'item.name == "cpu.usage"'
//! aggregate = { key = "agent", value = "item.value", window = "1m" }
//! to = ["rollups"]
//! ```
//!
//! Each message (element, under `foreach`) the rule takes is folded into the window of its
//! key that holds its time (the time the server received it; windows are aligned to the
//! Unix epoch: a 1-minute window starts on a whole minute). A window closes when a message
//! of its key arrives for a later window, or once its end has passed (the engine looks
//! every second), and the rule then sends one message to its sinks, on the topic of the
//! window's last message:
//!
//! ```json
//! {"key": "web-01", "start": "2026-12-06T10:00:00Z", "end": "2026-12-06T10:01:00Z",
//!  "count": 12, "sum": 301.5, "min": 3.0, "max": 97.5, "avg": 25.125, "last": 4.0}
//! ```
//!
//! (`sum` to `last` only with a `value`; a value that is not a number is a transform error,
//! sent to `on_error`.) The other transforms (`set`, `rename`, `drop`, `keep`) apply to the
//! roll-up. At most `max_keys` windows are open per rule (default 100,000): a message of a
//! new key beyond is sent to `on_error` with the reason, never dropped silently.
//! docs/guarantees.md says what a restart does to open windows.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::{json, Value};

use crate::transform::Expression;

/// `aggregate = { key, value, window, max_keys }`, compiled.
#[derive(Debug)]
pub struct Aggregate {
    /// The key (`None`: one window for the whole rule).
    pub key: Option<Expression>,
    /// The number folded (`None`: count only).
    pub value: Option<Expression>,
    /// The window's length.
    pub window: Duration,
    /// Most windows open at once.
    pub max_keys: usize,
}

impl Aggregate {
    /// What decides whether open windows carry over a reload.
    pub fn fingerprint(&self) -> String {
        format!(
            "{}|{}|{:?}|{}",
            self.key.as_ref().map(|k| k.source()).unwrap_or(""),
            self.value.as_ref().map(|k| k.source()).unwrap_or(""),
            self.window,
            self.max_keys
        )
    }
}

#[derive(Debug, Clone)]
struct Window {
    key: String,
    topic: String,
    start_ms: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: f64,
}

/// A window that closed: the topic of its last message and its roll-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    /// The topic of the window's last message.
    pub topic: String,
    /// The roll-up message.
    pub body: Value,
}

/// The open windows of one rule.
#[derive(Debug, Default)]
pub struct Windows {
    open: HashMap<String, Window>,
}

impl Windows {
    /// Windows open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// True when none is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Folds a message of `key` (with `value`, if the rule has one) received at `now_ms` on
    /// `topic`; a window of the key that this one ends is returned closed. An error when
    /// the key is new and `max_keys` windows are open.
    pub fn fold(
        &mut self,
        spec: &Aggregate,
        key: String,
        value: Option<f64>,
        topic: &str,
        now_ms: i64,
    ) -> Result<Option<Closed>, String> {
        let length = spec.window.as_millis().max(1) as i64;
        let start_ms = now_ms.div_euclid(length) * length;
        let mut closed = None;
        if let Some(w) = self.open.get(&key) {
            if w.start_ms < start_ms {
                closed = self.open.remove(&key).map(|w| rollup(w, spec));
            }
        }
        if !self.open.contains_key(&key) && self.open.len() >= spec.max_keys {
            return Err(format!(
                "aggregate: {} windows are open (max_keys): no room for key `{key}`",
                spec.max_keys
            ));
        }
        let v = value.unwrap_or(0.0);
        let w = self.open.entry(key.clone()).or_insert(Window {
            key,
            topic: topic.to_string(),
            start_ms,
            count: 0,
            sum: 0.0,
            min: v,
            max: v,
            last: v,
        });
        w.count += 1;
        w.sum += v;
        w.min = w.min.min(v);
        w.max = w.max.max(v);
        w.last = v;
        topic.clone_into(&mut w.topic);
        Ok(closed)
    }

    /// Closes every window whose end is at or before `now_ms`, oldest first; with `all`,
    /// the others too, their roll-ups marked `"partial": true` (a stop).
    pub fn close_due(&mut self, spec: &Aggregate, now_ms: i64, all: bool) -> Vec<Closed> {
        let length = spec.window.as_millis().max(1) as i64;
        let mut due: Vec<(Window, bool)> = Vec::new();
        self.open.retain(|_, w| {
            let over = w.start_ms.saturating_add(length) <= now_ms;
            if over || all {
                due.push((w.clone(), !over));
            }
            !(over || all)
        });
        due.sort_by(|a, b| {
            a.0.start_ms
                .cmp(&b.0.start_ms)
                .then_with(|| a.0.key.cmp(&b.0.key))
        });
        due.into_iter()
            .map(|(w, partial)| {
                let mut closed = rollup(w, spec);
                if let (true, Value::Object(map)) = (partial, &mut closed.body) {
                    map.insert("partial".into(), Value::Bool(true));
                }
                closed
            })
            .collect()
    }
}

fn rollup(w: Window, spec: &Aggregate) -> Closed {
    let length = spec.window.as_millis().max(1) as i64;
    let time = |ms: i64| {
        Utc.timestamp_millis_opt(ms)
            .single()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default()
    };
    let mut body = json!({
        "key": w.key,
        "start": time(w.start_ms),
        "end": time(w.start_ms.saturating_add(length)),
        "count": w.count,
    });
    if spec.value.is_some() {
        if let Value::Object(map) = &mut body {
            map.insert("sum".into(), json!(w.sum));
            map.insert("min".into(), json!(w.min));
            map.insert("max".into(), json!(w.max));
            map.insert("avg".into(), json!(w.sum / w.count.max(1) as f64));
            map.insert("last".into(), json!(w.last));
        }
    }
    Closed {
        topic: w.topic,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max_keys: usize) -> Aggregate {
        Aggregate {
            key: None,
            value: Some(crate::transform::Expression::compile("1.0", &[], &[]).unwrap()),
            window: Duration::from_secs(60),
            max_keys,
        }
    }

    #[test]
    fn a_window_closes_on_a_later_message_or_when_its_end_has_passed() {
        let s = spec(10);
        let mut w = Windows::default();
        let t0 = 1_800_000_000_000; // a whole minute
        for (i, v) in [3.0, 97.5, 4.0].iter().enumerate() {
            assert_eq!(
                w.fold(&s, "a".into(), Some(*v), "t/a", t0 + i as i64 * 1000)
                    .unwrap(),
                None
            );
        }
        assert_eq!(
            w.fold(&s, "b".into(), Some(1.0), "t/b", t0 + 59_999)
                .unwrap(),
            None
        );
        // a's next window: the first closes
        let closed = w
            .fold(&s, "a".into(), Some(10.0), "t/a2", t0 + 60_000)
            .unwrap()
            .unwrap();
        assert_eq!(closed.topic, "t/a");
        assert_eq!(closed.body["count"], 3);
        assert_eq!(closed.body["sum"], 104.5);
        assert_eq!(closed.body["min"], 3.0);
        assert_eq!(closed.body["max"], 97.5);
        assert_eq!(closed.body["last"], 4.0);
        assert_eq!(closed.body["end"].as_str().unwrap().len(), 24);
        // b's window is over at t0 + 60 s; a's second at t0 + 120 s
        let due = w.close_due(&s, t0 + 60_000, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].body["key"], "b");
        assert_eq!(due[0].body.get("partial"), None);
        assert_eq!(w.len(), 1);
        // a stop closes the rest early, marked
        let rest = w.close_due(&s, t0 + 61_000, true);
        assert_eq!(rest[0].body["avg"], 10.0);
        assert_eq!(rest[0].body["partial"], true);
        assert!(w.is_empty());
    }

    #[test]
    fn a_new_key_beyond_max_keys_is_an_error_not_a_silent_drop() {
        let s = spec(1);
        let mut w = Windows::default();
        w.fold(&s, "a".into(), Some(1.0), "t", 0).unwrap();
        let e = w.fold(&s, "b".into(), Some(1.0), "t", 0).unwrap_err();
        assert!(e.contains("max_keys"), "{e}");
        // the open key still folds
        w.fold(&s, "a".into(), Some(2.0), "t", 1).unwrap();
    }
}
