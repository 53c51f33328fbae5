//! A rule's transforms: what turns the message a rule matched into the message its sinks
//! get. `foreach` makes one message per element of a list; `set`, `rename`, `drop` and
//! `keep` then apply in that order to each message made:
//!
//! ```toml
//! foreach = "record.metrics"           # one message per metric; it starts as the metric
//! set = { host = "record.host", "labels.agent" = "agent" }    # CEL, fields created
//! rename = { value = "v" }             # old path = new path
//! drop = ["labels.cpu"]                # fields removed
//! keep = ["name", "v", "host", "labels"]   # every other field removed
//! ```
//!
//! A field is named by its path, dots between the levels (`labels.mount`). The
//! expressions are CEL with the variables of a `where` (`record` is always the message as
//! published) and, under `foreach`, `item` (the element) and `index` (its place, from 0).
//! Anything that fails (an expression reading a field the message lacks, a `foreach` that
//! is not a list, a field to set inside a value that is not a map) is an error the rule
//! sends, with the message as published, to its `on_error` sink: never dropped silently.

use cel::Context;
use serde_json::{Map, Value};

pub use crate::expression::Expression;

/// The variables an expression of a `foreach` rule has beyond those of a `where`.
pub const FOREACH_VARIABLES: [&str; 2] = ["item", "index"];

/// A field's path: the names of its levels, outermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parses `a.b.c`. Empty levels (`a..b`, a leading or trailing dot) are refused.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        let levels: Vec<String> = text.split('.').map(str::to_string).collect();
        if levels.iter().any(String::is_empty) {
            return Err(format!(
                "`{text}` is not a field path (names separated by single dots)"
            ));
        }
        Ok(FieldPath(levels))
    }

    /// The path as written.
    pub fn dotted(&self) -> String {
        self.0.join(".")
    }

    /// Removes the field from `value` and returns it (`None` when it is not there).
    fn take(&self, value: &mut Value) -> Option<Value> {
        let (last, parents) = self.0.split_last()?;
        let mut at = value;
        for name in parents {
            at = at.as_object_mut()?.get_mut(name)?;
        }
        at.as_object_mut()?.remove(last)
    }

    /// Sets the field in `value`, making the maps on the way that are missing. An error
    /// when a level on the way is there and not a map.
    fn put(&self, value: &mut Value, new: Value) -> Result<(), String> {
        let Some((last, parents)) = self.0.split_last() else {
            return Ok(());
        };
        let mut at = value;
        for (depth, name) in parents.iter().enumerate() {
            let map = at.as_object_mut().ok_or_else(|| self.not_a_map(depth))?;
            at = map
                .entry(name.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        let map = at
            .as_object_mut()
            .ok_or_else(|| self.not_a_map(parents.len()))?;
        map.insert(last.clone(), new);
        Ok(())
    }

    fn not_a_map(&self, depth: usize) -> String {
        match depth {
            0 => format!("cannot set `{}`: the message is not a map", self.dotted()),
            _ => format!(
                "cannot set `{}`: `{}` is not a map",
                self.dotted(),
                self.0[..depth].join(".")
            ),
        }
    }

    /// Copies the field, if `from` has it, into `to` at the same path.
    fn copy(&self, from: &Value, to: &mut Value) {
        let mut at = from;
        for name in &self.0 {
            match at.get(name) {
                Some(v) => at = v,
                None => return,
            }
        }
        // `to` is a map built by `keep` itself: the levels on the way are maps
        let _ = self.put(to, at.clone());
    }
}

/// `set`, `rename`, `drop` and `keep` of one rule, compiled.
#[derive(Debug, Default)]
pub struct Transforms {
    /// Fields computed by CEL expressions, in the order written.
    pub set: Vec<(FieldPath, Expression)>,
    /// Fields moved: (old path, new path).
    pub rename: Vec<(FieldPath, FieldPath)>,
    /// Fields removed.
    pub drop: Vec<FieldPath>,
    /// When not empty, the only fields left.
    pub keep: Vec<FieldPath>,
}

impl Transforms {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.rename.is_empty()
            && self.drop.is_empty()
            && self.keep.is_empty()
    }

    /// The message made from `base` (the message as published, or a `foreach` element):
    /// every `set` computed in `ctx` first (each sees the message as published, not the
    /// others' results), then set, renamed, dropped and kept, in that order.
    pub fn apply(&self, mut base: Value, ctx: &Context) -> Result<Value, String> {
        let mut values = Vec::with_capacity(self.set.len());
        for (path, expr) in &self.set {
            let value = expr
                .evaluate_json(ctx)
                .map_err(|e| format!("set.{}: {e}", path.dotted()))?;
            values.push(value);
        }
        for ((path, _), value) in self.set.iter().zip(values) {
            path.put(&mut base, value)?;
        }
        for (from, to) in &self.rename {
            if let Some(value) = from.take(&mut base) {
                to.put(&mut base, value)
                    .map_err(|e| format!("rename.{}: {e}", from.dotted()))?;
            }
        }
        for path in &self.drop {
            path.take(&mut base);
        }
        if !self.keep.is_empty() {
            let mut kept = Value::Object(Map::new());
            for path in &self.keep {
                path.copy(&base, &mut kept);
            }
            base = kept;
        }
        Ok(base)
    }
}

/// The message a `foreach` element starts as: the element when it is a map, else a map of
/// `value`, the element.
pub fn element_base(item: &Value) -> Value {
    match item {
        Value::Object(_) => item.clone(),
        other => serde_json::json!({ "value": other }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbus_protocol::Message;

    fn transforms(
        set: &[(&str, &str)],
        rename: &[(&str, &str)],
        drop: &[&str],
        keep: &[&str],
    ) -> Transforms {
        Transforms {
            set: set
                .iter()
                .map(|(p, e)| {
                    (
                        FieldPath::parse(p).unwrap(),
                        Expression::compile(e, &[], &FOREACH_VARIABLES).unwrap(),
                    )
                })
                .collect(),
            rename: rename
                .iter()
                .map(|(a, b)| (FieldPath::parse(a).unwrap(), FieldPath::parse(b).unwrap()))
                .collect(),
            drop: drop.iter().map(|p| FieldPath::parse(p).unwrap()).collect(),
            keep: keep.iter().map(|p| FieldPath::parse(p).unwrap()).collect(),
        }
    }

    fn message(body: &str) -> Message {
        Message::decode("fleet/web-1/telemetry/metrics", body.as_bytes()).unwrap()
    }

    #[test]
    fn set_rename_drop_keep_apply_in_that_order() {
        let msg = message(r#"{"host":"h1","load":{"one":0.5,"five":0.25},"junk":1}"#);
        let ctx = crate::condition::context_for(&msg);
        let t = transforms(
            &[
                ("labels.host", "record.host"),
                ("one", "record.load.one * 2.0"),
            ],
            &[("load.five", "five"), ("missing", "never")],
            &["junk", "load"],
            &[],
        );
        let out = t.apply(msg.body.clone(), &ctx).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"agent":"web-1","stream":"metrics","host":"h1","labels":{"host":"h1"},"one":1.0,"five":0.25})
        );
        // keep last: only these survive, nested paths keep their levels
        let t = transforms(
            &[("x", "1")],
            &[("host", "hostname")],
            &[],
            &["hostname", "load.one", "x", "absent"],
        );
        let out = t.apply(msg.body.clone(), &ctx).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"hostname":"h1","load":{"one":0.5},"x":1})
        );
    }

    #[test]
    fn a_failing_transform_says_which_and_why() {
        let msg = message(r#"{"host":"h1"}"#);
        let ctx = crate::condition::context_for(&msg);
        let e = transforms(&[("x", "record.nothere")], &[], &[], &[])
            .apply(msg.body.clone(), &ctx)
            .unwrap_err();
        assert!(e.starts_with("set.x: "), "{e}");
        let e = transforms(&[("host.name", "1")], &[], &[], &[])
            .apply(msg.body.clone(), &ctx)
            .unwrap_err();
        assert_eq!(e, "cannot set `host.name`: `host` is not a map");
        let e = transforms(&[("a", "1")], &[], &[], &[])
            .apply(serde_json::json!(5), &ctx)
            .unwrap_err();
        assert_eq!(e, "cannot set `a`: the message is not a map");
    }

    #[test]
    fn paths_are_checked() {
        assert!(FieldPath::parse("a.b").is_ok());
        for bad in ["", ".a", "a.", "a..b"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_element_that_is_not_a_map_becomes_value() {
        assert_eq!(
            element_base(&serde_json::json!(3)),
            serde_json::json!({"value": 3})
        );
        assert_eq!(
            element_base(&serde_json::json!({"a": 1})),
            serde_json::json!({"a": 1})
        );
    }
}
