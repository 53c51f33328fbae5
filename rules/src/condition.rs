//! Rule conditions (`where = '...'`) in CEL, the Common Expression Language (the `cel`
//! crate): safe, side-effect free, always terminating.
//!
//! Variables available to a condition:
//!
//! | name | type | value |
//! |---|---|---|
//! | `topic` | string | the MQTT topic |
//! | `segments` | list of strings | the topic split at `/` |
//! | `agent` | string | the agent id (from the topic), `""` if none |
//! | `stream` | string | the telemetry stream, `""` if none |
//! | `record` | map | the decoded payload (a record: `seq`, `ts`, `event`, `metrics`, `fields`...) |
//!
//! A condition that fails to evaluate for a message (e.g. it reads a field the message does
//! not have: guard with `has(record.event)`) does not match that message; the failure is
//! counted per rule and logged at debug level.

use cel::{Context, ExecutionError, Value};

use crate::expression::Expression;
use crate::filter::TopicFilter;

/// Names of the variables a condition can use.
pub const VARIABLES: [&str; 5] = ["topic", "segments", "agent", "stream", "record"];

/// A compiled condition: an [`Expression`] whose value must be a boolean.
#[derive(Debug)]
pub struct Condition {
    expr: Expression,
}

impl Condition {
    /// Compiles `source` for a rule open to any topic; syntax errors and unknown
    /// variables are reported (see [`Condition::compile_for`]).
    pub fn compile(source: &str) -> Result<Condition, String> {
        Condition::compile_for(source, &[])
    }

    /// Compiles `source` for a rule listening to `from`. Reported: syntax errors, unknown
    /// variables (inside macros too), and, where `from` says which kind of message
    /// `record` is, fields that kind does not have and comparisons of a field with a
    /// literal of another type, which would never match ([`crate::schema`]).
    pub fn compile_for(source: &str, from: &[TopicFilter]) -> Result<Condition, String> {
        Condition::compile_with(source, from, &[])
    }

    /// [`Condition::compile_for`], where the variables `more` exist too (a `foreach`
    /// rule's `item` and `index`).
    pub fn compile_with(
        source: &str,
        from: &[TopicFilter],
        more: &[&str],
    ) -> Result<Condition, String> {
        Expression::compile(source, from, more).map(|expr| Condition { expr })
    }

    /// What it reads of `record`.
    pub fn record_use(&self) -> crate::record_use::RecordUse {
        self.expr.record_use()
    }

    /// True when it names the variable `name`.
    pub fn names(&self, name: &str) -> bool {
        self.expr.names(name)
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        self.expr.source()
    }

    /// Evaluates the condition in a context made by [`context_for`]. Anything but `true`
    /// is no match; evaluation errors are returned for counting.
    pub fn evaluate_in(&self, ctx: &Context) -> Result<bool, ExecutionError> {
        match self.expr.execute(ctx)? {
            Value::Bool(b) => Ok(b),
            other => Err(ExecutionError::function_error(
                "where",
                format!("condition must be true or false, got {:?}", other.type_of()),
            )),
        }
    }
}

/// The evaluation context for `msg` (built once per message, shared by every rule): the
/// variables above, the same that a SQL sink's computed columns see.
pub use fleetbus_sinks::columns::context_for;

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbus_protocol::Message;

    fn eval(expr: &str, topic: &str, body: &str) -> Result<bool, ExecutionError> {
        let c = Condition::compile(expr).unwrap();
        let m = Message::decode(topic, body.as_bytes()).unwrap();
        let ctx = context_for(&m);
        c.evaluate_in(&ctx)
    }

    #[test]
    fn conditions_see_record_topic_and_agent() {
        let body = r#"{"seq":3,"metrics":[{"name":"cpu.usage","value":97.5}]}"#;
        let t = "fleet/web-1/telemetry/metrics";
        assert!(eval(
            r#"record.metrics.exists(m, m.name == "cpu.usage" && m.value > 90.0)"#,
            t,
            body
        )
        .unwrap());
        assert!(!eval(r#"record.metrics.exists(m, m.value > 99.0)"#, t, body).unwrap());
        assert!(eval(
            r#"agent.startsWith("web-") && stream == "metrics" && segments[2] == "telemetry""#,
            t,
            body
        )
        .unwrap());
        assert!(eval("record.seq == 3", t, body).unwrap());
    }

    #[test]
    fn missing_fields_are_errors_not_matches_and_has_guards_them() {
        let t = "fleet/a/telemetry/events";
        assert!(eval("record.event.severity >= 4", t, "{}").is_err());
        assert!(!eval("has(record.event) && record.event.severity >= 4", t, "{}").unwrap());
    }

    #[test]
    fn compile_reports_syntax_errors_and_unknown_variables() {
        let e = Condition::compile("record.seq >").unwrap_err();
        assert!(e.contains("Syntax error"), "{e}");
        let e = Condition::compile("recod.seq > 1").unwrap_err();
        assert!(e.contains("unknown variable `recod`"), "{e}");
        let e =
            Condition::compile("record.metrics.exists(m, m.value > 90.0 && cpu > 1)").unwrap_err();
        assert!(e.contains("unknown variable `cpu`"), "{e}");
        // comprehension variables are fine
        assert!(Condition::compile("record.metrics.exists(m, m.value > 1.0)").is_ok());
    }

    #[test]
    fn non_boolean_condition_is_an_error() {
        assert!(eval("record.seq", "fleet/a/telemetry/m", r#"{"seq":1}"#).is_err());
    }

    /// A check result's undetermined value (`U`) is `null`: a condition guards with
    /// `m.value != null` and the others are compared as usual.
    #[test]
    fn an_undetermined_metric_value_is_null_and_can_be_guarded() {
        let t = "fleet/a/telemetry/checks";
        let body = r#"{"seq":1,"metrics":[{"name":"a","value":null},{"name":"b","value":95.0}]}"#;
        assert!(eval(
            r#"record.metrics.exists(m, m.value != null && m.value > 90.0)"#,
            t,
            body
        )
        .unwrap());
        assert!(!eval(r#"record.metrics.all(m, m.value != null)"#, t, body).unwrap());
    }
}
