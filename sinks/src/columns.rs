//! Computed columns of the SQL sinks: `columns = { NAME = "CEL expression", ... }` gives a
//! `postgres` or `sqlite` sink a typed layout. Each row keeps the key columns that make it
//! exactly once (agent, stream, epoch, seq, ts, topic, received) and, instead of the whole
//! message, one column per entry: the value of its expression for the message.
//!
//! The expressions are CEL, with the variables of a rule's `where` (`topic`, `segments`,
//! `agent`, `stream`, `record`; [`context_for`]) and `dead_letter`: `null`, or for a dead
//! letter from another sink a map of `sink`, `error`, `attempts` and `failed_at_ms`, so a
//! dead-letter table keeps why ([`COLUMN_VARIABLES`]). A message for which an expression
//! fails (a field it does not have: guard with `has()`) cannot be a row: it goes to the
//! sink's dead letter with the error, and the rows around it are written.
//!
//! The message's CEL variables are made here for the rules too: [`context_for`] and
//! [`context_with`] bind them all, [`MessageVariables`] (the router's) makes each as an
//! expression reads it.

use std::collections::BTreeMap;
use std::sync::Arc;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use cel::{Context, Program, Value};
use fleetbus_config::Problems;
use fleetbus_protocol::Message;

use crate::row::plain_identifier;
use crate::{Item, SinkError};

/// The variables a computed column has beyond those of a rule's `where`.
pub const COLUMN_VARIABLES: [&str; 1] = ["dead_letter"];

/// The columns every row has whatever its layout: a computed column cannot be one of them.
pub const KEY_COLUMNS: [&str; 7] = ["agent", "stream", "epoch", "seq", "ts", "topic", "received"];

/// The value of one computed column for one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// CEL `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer (a CEL `uint` above `i64::MAX` is a [`Cell::Text`] of its digits).
    Int(i64),
    /// A double.
    Float(f64),
    /// A string; also a timestamp (RFC 3339), a duration (seconds: `1.5s`) and bytes (as
    /// UTF-8, invalid sequences replaced).
    Text(String),
    /// A map or a list, as JSON text.
    Json(String),
}

impl Cell {
    /// The cell as JSON text (a string quoted, a map or list as it is).
    pub fn to_json(&self) -> Option<String> {
        match self {
            Cell::Null => None,
            Cell::Bool(b) => Some(b.to_string()),
            Cell::Int(n) => Some(n.to_string()),
            Cell::Float(x) => Some(serde_json::Value::from(*x).to_string()),
            Cell::Text(s) => Some(serde_json::Value::from(s.as_str()).to_string()),
            Cell::Json(j) => Some(j.clone()),
        }
    }

    /// The cell as the text a database casts to a column's type (`91.5`, `true`, a
    /// string as it is, a map or list as JSON).
    pub fn to_text(&self) -> Option<String> {
        match self {
            Cell::Text(s) => Some(s.clone()),
            other => other.to_json(),
        }
    }
}

/// A sink's compiled `columns`, in name order.
pub struct Computed {
    columns: Vec<(String, Program)>,
}

impl std::fmt::Debug for Computed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.columns.iter().map(|(n, _)| n))
            .finish()
    }
}

/// Records the problems of a `columns` table at `columns.NAME`: a name that is not a plain
/// SQL identifier or is a key column, an expression that does not compile. (Unknown
/// variables are found by `rules check`, which knows CEL's macros.)
pub fn check(columns: &BTreeMap<String, String>, p: &mut Problems) {
    for (name, source) in columns {
        let key = format!("columns.{name}");
        if !plain_identifier(name) {
            p.add(
                &key,
                "a column name is 1-63 characters of [A-Za-z0-9_], not starting with a digit",
            );
        } else if KEY_COLUMNS.contains(&name.as_str()) {
            p.add(
                &key,
                format!("`{name}` is a key column every row has; name the computed one otherwise"),
            );
        }
        if let Err(e) = compile_one(source) {
            p.add(&key, e);
        }
    }
}

fn compile_one(source: &str) -> Result<Program, String> {
    Program::compile(source).map_err(|e| {
        e.to_string()
            .replace("ERROR: <input>:", "expression position ")
    })
}

impl Computed {
    /// Compiles `columns` (`None` when there are none: the default layout).
    pub fn compile(columns: &BTreeMap<String, String>) -> Result<Option<Arc<Computed>>, SinkError> {
        if columns.is_empty() {
            return Ok(None);
        }
        let mut compiled = Vec::new();
        for (name, source) in columns {
            let program = compile_one(source)
                .map_err(|e| SinkError::Config(format!("columns.{name}: {e}")))?;
            compiled.push((name.clone(), program));
        }
        Ok(Some(Arc::new(Computed { columns: compiled })))
    }

    /// The column names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|(n, _)| n.as_str())
    }

    /// How many columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Never true (a sink without `columns` has no [`Computed`]); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The cells of `item`, one per column in order. An expression that fails is a
    /// permanent error naming the column: the message cannot be a row.
    pub fn cells(&self, item: &Item) -> Result<Vec<Cell>, SinkError> {
        let msg = item.message()?;
        let mut ctx = context_for(msg);
        let dead_letter = match item.dead_letter() {
            // its fields: sink, error, attempts, failed_at_ms
            Some(dl) => cel::to_value(dl).unwrap_or(Value::Null),
            None => Value::Null,
        };
        ctx.add_variable_from_value(COLUMN_VARIABLES[0], dead_letter);
        self.columns
            .iter()
            .map(|(name, program)| {
                let value = program
                    .execute(&ctx)
                    .map_err(|e| SinkError::Encode(format!("{}: column {name}: {e}", msg.topic)))?;
                cell(&value)
                    .map_err(|e| SinkError::Encode(format!("{}: column {name}: {e}", msg.topic)))
            })
            .collect()
    }
}

/// The CEL variables of a message: `topic`, `segments` (the topic split at `/`), `agent`
/// and `stream` (`""` when the topic has none) and `record` (the decoded payload). A
/// rule's `where` sees the same.
///
/// The standard library's environment is built once: `Context::default()` builds it
/// afresh each time, which took 38 µs a message, a hundred times a condition's evaluation.
pub fn context_for(msg: &Message) -> Context<'_, '_> {
    context_with(msg, None, true)
}

/// [`context_for`] whose `record` holds only the top-level fields `only` (when given and
/// the body is a map), and `segments` only when asked: what a rule set's expressions read,
/// no more (`fleetbus_rules`' `RecordUse`).
pub fn context_with<'m>(
    msg: &'m Message,
    only: Option<&std::collections::BTreeSet<String>>,
    segments: bool,
) -> Context<'m, 'm> {
    let mut ctx = Context::with_env(stdlib());
    ctx.add_variable_as_val("topic", Box::new(CelString::from(msg.topic.as_str())));
    if segments {
        ctx.add_variable_as_val("segments", segments_val(msg));
    }
    let (agent, stream) = agent_and_stream(msg);
    ctx.add_variable_as_val("agent", Box::new(CelString::from(agent)));
    ctx.add_variable_as_val("stream", Box::new(CelString::from(stream)));
    ctx.add_variable_as_val("record", record_val(msg, only));
    ctx
}

/// The standard library's environment, built once.
fn stdlib() -> Arc<cel::Env> {
    static STDLIB: std::sync::OnceLock<Arc<cel::Env>> = std::sync::OnceLock::new();
    STDLIB.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

/// `segments`: the topic split at `/`.
fn segments_val(msg: &Message) -> Box<dyn Val + '_> {
    let segments: Vec<Box<dyn Val>> = msg
        .segments()
        .map(|s| Box::new(CelString::from(s)) as Box<dyn Val>)
        .collect();
    Box::new(CelList::from(segments))
}

/// `agent` and `stream`: from the topic, else the body's fields of those names, else `""`.
fn agent_and_stream(msg: &Message) -> (&str, &str) {
    // the topic parsed once (`Message::agent` and `stream` would parse it each)
    let topic = fleetbus_protocol::Topic::parse(&msg.topic);
    let from_body = |key: &str| msg.body.get(key).and_then(serde_json::Value::as_str);
    let agent = topic.agent().or_else(|| from_body("agent")).unwrap_or("");
    let stream = topic.stream().or_else(|| from_body("stream")).unwrap_or("");
    (agent, stream)
}

/// `record`: the body, or of a map body only the fields `only`.
fn record_val<'m>(
    msg: &'m Message,
    only: Option<&std::collections::BTreeSet<String>>,
) -> Box<dyn Val + 'm> {
    match (only, &msg.body) {
        (Some(keys), serde_json::Value::Object(map)) => Box::new(CelMap::from(
            keys.iter()
                .filter_map(|k| map.get_key_value(k.as_str()))
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_val(v)))
                .collect::<std::collections::HashMap<_, _>>(),
        )) as Box<dyn Val>,
        _ => json_val(&msg.body),
    }
}

/// The variables of [`context_with`] as a CEL variable resolver: each is made only when an
/// expression reads it, `record` at most once. A context over it
/// ([`MessageVariables::context`]) costs no allocation until then, where
/// [`context_with`] inserts every variable under a name of its own: the rules engine
/// routes each message through one of these.
pub struct MessageVariables<'a> {
    msg: &'a Message,
    only: Option<&'a std::collections::BTreeSet<String>>,
    segments: bool,
    names: std::sync::OnceLock<(&'a str, &'a str)>,
    record: std::sync::OnceLock<Box<dyn Val + 'a>>,
}

impl<'a> MessageVariables<'a> {
    /// The variables of `msg`, with `record` and `segments` as in [`context_with`].
    pub fn new(
        msg: &'a Message,
        only: Option<&'a std::collections::BTreeSet<String>>,
        segments: bool,
    ) -> Self {
        MessageVariables {
            msg,
            only,
            segments,
            names: std::sync::OnceLock::new(),
            record: std::sync::OnceLock::new(),
        }
    }

    /// A context (the standard library's) whose variables are these.
    pub fn context(&self) -> Context<'_, '_> {
        let mut ctx = Context::with_env(stdlib());
        ctx.set_variable_resolver(self);
        ctx
    }
}

impl cel::context::VariableResolver for MessageVariables<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<cel::common::value::CowVal<'b, 'b>> {
        use cel::common::value::CowVal;
        let names = || *self.names.get_or_init(|| agent_and_stream(self.msg));
        Some(match variable {
            "record" => CowVal::Borrowed(
                self.record
                    .get_or_init(|| record_val(self.msg, self.only))
                    .as_ref(),
            ),
            "topic" => CowVal::Owned(Box::new(CelString::from(self.msg.topic.as_str()))),
            "agent" => CowVal::Owned(Box::new(CelString::from(names().0))),
            "stream" => CowVal::Owned(Box::new(CelString::from(names().1))),
            "segments" if self.segments => CowVal::Owned(segments_val(self.msg)),
            _ => return None,
        })
    }
}

/// `value` as a CEL value, built in one pass and borrowing its strings and keys: through
/// serde and `cel::Value` it took three passes (the value serialized into a `cel::Value`,
/// which `Context` then converts again, cloning every map) and a copy of every string,
/// about 4 µs for a 200-byte record. Numbers as serde gives them to CEL: an unsigned
/// integer as `uint`, a negative one as `int`, any other as `double`.
pub fn json_val(value: &serde_json::Value) -> Box<dyn Val + '_> {
    use serde_json::Value as J;
    match value {
        J::Null => Box::new(CelNull),
        J::Bool(b) => Box::new(CelBool::from(*b)),
        J::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Box::new(CelUInt::from(u)),
            (None, Some(i)) => Box::new(CelInt::from(i)),
            _ => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        J::String(s) => Box::new(CelString::from(s.as_str())),
        J::Array(items) => Box::new(CelList::from(
            items.iter().map(json_val).collect::<Vec<_>>(),
        )),
        J::Object(map) => Box::new(CelMap::from(
            map.iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_val(v)))
                .collect::<std::collections::HashMap<_, _>>(),
        )),
    }
}

/// The cell of a CEL result.
fn cell(value: &Value) -> Result<Cell, String> {
    Ok(match value {
        Value::Null => Cell::Null,
        Value::Bool(b) => Cell::Bool(*b),
        Value::Int(n) => Cell::Int(*n),
        Value::UInt(n) => match i64::try_from(*n) {
            Ok(n) => Cell::Int(n),
            Err(_) => Cell::Text(n.to_string()),
        },
        Value::Float(x) => Cell::Float(*x),
        Value::String(s) => Cell::Text(s.to_string()),
        Value::Bytes(b) => Cell::Text(String::from_utf8_lossy(b).into_owned()),
        Value::Timestamp(t) => Cell::Text(t.to_rfc3339()),
        Value::Duration(d) => Cell::Text(format!("{}s", d.num_milliseconds() as f64 / 1000.0)),
        Value::List(_) | Value::Map(_) => Cell::Json(to_json(value)?.to_string()),
        other => return Err(format!("a {:?} cannot be a column value", other.type_of())),
    })
}

/// A CEL value as JSON (a map or list cell, a value a rule's transform sets).
pub fn to_json(value: &Value) -> Result<serde_json::Value, String> {
    use cel::objects::Key;
    Ok(match value {
        Value::List(items) => {
            serde_json::Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Value::Map(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.map.iter() {
                let k = match k {
                    Key::String(s) => s.to_string(),
                    Key::Int(n) => n.to_string(),
                    Key::Uint(n) => n.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                out.insert(k, to_json(v)?);
            }
            serde_json::Value::Object(out)
        }
        scalar => match cell(scalar)? {
            Cell::Null => serde_json::Value::Null,
            Cell::Bool(b) => b.into(),
            Cell::Int(n) => n.into(),
            Cell::Float(x) => x.into(),
            Cell::Text(s) => s.into(),
            Cell::Json(j) => serde_json::from_str(&j).map_err(|e| e.to_string())?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(columns: &[(&str, &str)], body: &str) -> Result<Vec<Cell>, SinkError> {
        let map = columns
            .iter()
            .map(|(n, e)| (n.to_string(), e.to_string()))
            .collect();
        let computed = Computed::compile(&map).unwrap().unwrap();
        computed.cells(&item(body, None))
    }

    fn item(body: &str, dead_letter: Option<fleetbus_wal::DeadLetter>) -> Item {
        let msg = Message::decode("fleet/web-1/telemetry/metrics", body.as_bytes()).unwrap();
        match dead_letter {
            Some(dl) => Item::new(1, msg).with_dead_letter(dl),
            None => Item::new(1, msg),
        }
    }

    #[test]
    fn a_dead_letter_says_why_to_its_columns() {
        let map = [
            ("why", "dead_letter == null ? 'written' : dead_letter.error"),
            ("given_up_by", "dead_letter == null ? '' : dead_letter.sink"),
        ]
        .iter()
        .map(|(n, e)| (n.to_string(), e.to_string()))
        .collect();
        let computed = Computed::compile(&map).unwrap().unwrap();
        let dead = fleetbus_wal::DeadLetter {
            sink: "pg".into(),
            error: "23514: check violated".into(),
            attempts: 3,
            failed_at_ms: 1,
        };
        assert_eq!(
            computed.cells(&item(r#"{"seq":1}"#, Some(dead))).unwrap(),
            vec![
                Cell::Text("pg".into()),
                Cell::Text("23514: check violated".into())
            ]
        );
        assert_eq!(
            computed.cells(&item(r#"{"seq":1}"#, None)).unwrap(),
            vec![Cell::Text(String::new()), Cell::Text("written".into())]
        );
    }

    #[test]
    fn each_column_is_its_expression_for_the_message() {
        let body =
            r#"{"seq":3,"host":"h1","metrics":[{"name":"cpu","value":97.5,"labels":{"cpu":"0"}}]}"#;
        let got = cells(
            &[
                ("a_host", "record.host"),
                ("b_value", "record.metrics[0].value"),
                ("c_hot", "record.metrics[0].value > 90.0"),
                ("d_labels", "record.metrics[0].labels"),
                ("e_seq", "record.seq + 1u"),
                ("f_agent", "agent"),
                ("g_none", "null"),
            ],
            body,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                Cell::Text("h1".into()),
                Cell::Float(97.5),
                Cell::Bool(true),
                Cell::Json(r#"{"cpu":"0"}"#.into()),
                Cell::Int(4),
                Cell::Text("web-1".into()),
                Cell::Null,
            ]
        );
        assert_eq!(got[0].to_json().as_deref(), Some("\"h1\""));
        assert_eq!(got[0].to_text().as_deref(), Some("h1"));
        assert_eq!(got[6].to_text(), None);
    }

    #[test]
    fn a_failing_expression_names_its_column() {
        let e = cells(&[("usage", "record.metrics[0].value")], r#"{"seq":1}"#).unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::Permanent);
        assert!(e.to_string().contains("column usage"), "{e}");
    }

    #[test]
    fn names_and_expressions_are_checked() {
        let map: BTreeMap<String, String> = [
            ("seq", "record.seq"),
            ("bad name", "1"),
            ("ok", "record.seq >"),
            ("fine", "record.seq"),
        ]
        .iter()
        .map(|(n, e)| (n.to_string(), e.to_string()))
        .collect();
        let problems = fleetbus_config::problems_of(&Checked(map));
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(text
            .iter()
            .any(|t| t.starts_with("columns.seq: `seq` is a key column")));
        assert!(text
            .iter()
            .any(|t| t.starts_with("columns.bad name: a column name")));
        assert!(text.iter().any(|t| t.starts_with("columns.ok: ")));
    }

    struct Checked(BTreeMap<String, String>);

    impl fleetbus_config::Check for Checked {
        fn check(&self, p: &mut Problems) {
            check(&self.0, p);
        }
    }
}
