//! The default table layout of the SQL sinks (SQLite, PostgreSQL): one row per message, its
//! key columns taken from the topic and the record, and the message itself as JSON.
//!
//! | column | from |
//! |---|---|
//! | `agent`, `stream` | a telemetry topic `fleet/AGENT/telemetry/STREAM` (else NULL) |
//! | `epoch` | the record's `epoch` (0 when it has none), a u64 stored with the same bits as a signed 64-bit integer; NULL when the row is not the record itself (below) |
//! | `seq` | the record's `seq`; NULL when the row is not the record itself |
//! | `ts` | the record's `ts` |
//! | `topic`, `received` | the message's topic and when the server received it |
//! | `message` | the record (or the dead letter around it) as JSON |
//!
//! A sink with `columns` has computed columns instead of `message` ([`crate::columns`]).
//!
//! `UNIQUE (agent, stream, epoch, seq)` makes a record's row exactly once. A message a
//! rule's transforms made (`foreach` makes several of one record) and a dead letter (a
//! rule failing for each element of one record, several sinks giving up the same record)
//! are not the record: their `epoch` and `seq` are NULL, so that they never collide with
//! the record or one another (a collision would drop all but the first, silently), and
//! their rows are exactly once by the position each batch commits with its rows.

use chrono::{DateTime, Utc};
use fleetbus_protocol::Topic;

use crate::{Item, SinkError};

/// The table of positions both SQL sinks keep beside their rows, one row per sink and
/// table: the log index after the last batch committed.
pub const POSITIONS: &str = "fleetbus_sink_positions";

/// One message as the columns of its row.
#[derive(Debug, Clone)]
pub struct Row {
    /// The agent of a telemetry topic.
    pub agent: Option<String>,
    /// The stream of a telemetry topic.
    pub stream: Option<String>,
    /// The record's epoch (0 without one) for telemetry.
    pub epoch: Option<i64>,
    /// The record's sequence number.
    pub seq: Option<i64>,
    /// The record's own timestamp, as it wrote it.
    pub ts: Option<String>,
    /// The message's topic.
    pub topic: String,
    /// When the server received it.
    pub received: DateTime<Utc>,
    /// The record (or its dead-letter envelope) as JSON.
    pub message: String,
    /// The values of the sink's computed columns, in their order (none in the default
    /// layout; see [`crate::columns`]).
    pub computed: Vec<crate::columns::Cell>,
}

impl Row {
    /// The row of `item` with the values of `computed` columns, if the sink has any. An
    /// error (permanent) when a computed column's expression fails for it.
    pub fn with(
        item: &Item,
        computed: Option<&crate::columns::Computed>,
    ) -> Result<Row, SinkError> {
        match computed {
            // the computed columns replace `message`: its JSON is not rendered
            Some(c) => Ok(Row {
                computed: c.cells(item)?,
                ..Row::keys(item, String::new())?
            }),
            None => Row::of(item),
        }
    }

    /// The row of `item`. An error (permanent) when its `seq` does not fit a signed 64-bit
    /// column or it cannot be encoded.
    pub fn of(item: &Item) -> Result<Row, SinkError> {
        let mut json = Vec::new();
        crate::json_line(item, &mut json)?;
        json.pop(); // the newline
        let message = String::from_utf8(json).map_err(|e| SinkError::Encode(e.to_string()))?;
        Row::keys(item, message)
    }

    /// The key columns of `item`, with `message` as given.
    fn keys(item: &Item, message: String) -> Result<Row, SinkError> {
        let msg = item.message()?;
        let (mut agent, mut stream, mut epoch, mut seq, mut ts) = (None, None, None, None, None);
        if let Topic::Telemetry {
            agent: a,
            stream: s,
        } = Topic::parse(&msg.topic)
        {
            agent = Some(a.to_string());
            stream = Some(s.to_string());
            ts = msg
                .body
                .get("ts")
                .and_then(|t| t.as_str())
                .map(str::to_string);
        }
        let the_record = item.entry.produced.is_none() && item.entry.dead_letter.is_none();
        if agent.is_some() && the_record {
            // an epoch is a random u64: stored as the signed integer with the same bits
            // (0 for agents that do not send one), so the unique key always has it
            epoch = Some(msg.body.get("epoch").and_then(|e| e.as_u64()).unwrap_or(0) as i64);
            seq = match msg.body.get("seq").and_then(|s| s.as_u64()) {
                Some(n) => Some(i64::try_from(n).map_err(|_| {
                    SinkError::Encode(format!(
                        "{}: seq {n} does not fit a signed 64-bit column",
                        msg.topic
                    ))
                })?),
                None => None,
            };
        }
        Ok(Row {
            agent,
            stream,
            epoch,
            seq,
            ts,
            topic: msg.topic.clone(),
            received: msg.received,
            message,
            computed: Vec::new(),
        })
    }
}

/// The table of the SQL sinks when the rules file names none.
pub fn default_table() -> String {
    "messages".into()
}

/// `create_table`'s default: on.
pub fn default_create_table() -> bool {
    true
}

/// Records a problem at `table` when the name cannot be used as a plain SQL identifier
/// (or, for a template, when it does not parse or its text is not of identifier
/// characters).
pub fn check_table(table: &str, p: &mut fleetbus_config::Problems) {
    match TableName::parse(table) {
        Ok(_) => {}
        Err(e) => p.add("table", e),
    }
}

/// How many tables of a template a SQL sink remembers as made (or read): beyond it the
/// memory is cleared and each table is looked at again, so a template over fields that
/// take endless values costs bounded memory.
pub const TABLES_REMEMBERED: usize = 10_000;

/// A SQL sink's `table`: a plain name, or a template (`metrics_{agent}`,
/// `events_%Y%m`) rendered per message into one: the template engine of the other sinks,
/// each rendered name made an identifier (lowercase; a character outside `[A-Za-z0-9_]`
/// becomes `_`, a leading digit gets `t_` before it, a name over 63 characters is cut
/// with a hash of the whole).
#[derive(Debug, Clone)]
pub enum TableName {
    /// One table for every message.
    Fixed(String),
    /// A table per rendered name.
    Template(crate::PathTemplate),
}

impl TableName {
    /// Parses `text`: a template when it has a placeholder or a strftime field.
    pub fn parse(text: &str) -> Result<TableName, String> {
        if !text.contains(['{', '%']) {
            return match plain_identifier(text) {
                true => Ok(TableName::Fixed(text.to_string())),
                false => Err(format!(
                    "`{text}` must be 1-63 characters of [A-Za-z0-9_], not starting with a digit"
                )),
            };
        }
        let template = crate::PathTemplate::parse(text).map_err(|e| e.to_string())?;
        // the text around the placeholders and fields must be identifier characters
        let mut literal = String::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            rest = rest[open..].split_once('}').map(|(_, r)| r).unwrap_or("");
        }
        literal.push_str(rest);
        let mut chars = literal.chars();
        while let Some(c) = chars.next() {
            match c {
                '%' => {
                    chars.next(); // a strftime field renders digits or letters
                }
                c if c.is_ascii_alphanumeric() || c == '_' => {}
                c => {
                    return Err(format!(
                        "`{text}`: `{c}` cannot be in a table name (only [A-Za-z0-9_] around the placeholders)"
                    ))
                }
            }
        }
        Ok(TableName::Template(template))
    }

    /// True for a template.
    pub fn is_template(&self) -> bool {
        matches!(self, TableName::Template(_))
    }

    /// The table of `msg`, as it goes into SQL: a fixed name as configured, a rendered
    /// one double-quoted (so a name that is a keyword, such as `order`, still works; the
    /// rendered identifier is lowercase, so quoted it is the table an unquoted name would
    /// be).
    pub fn of(&self, msg: &fleetbus_protocol::Message) -> String {
        match self {
            TableName::Fixed(name) => name.clone(),
            TableName::Template(t) => format!("\"{}\"", identifier(&t.render(msg))),
        }
    }
}

/// `rendered` as an SQL identifier (see [`TableName`]).
fn identifier(rendered: &str) -> String {
    let mut name: String = rendered
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_lowercase(),
            false => '_',
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert_str(0, "t_");
    }
    if name.len() > 63 {
        // of the text lowercased: names differing only in case are one table, long or not
        let hash = crate::template::fnv1a(rendered.to_ascii_lowercase().as_bytes());
        name.truncate(46);
        name.push_str(&format!("_{hash:016x}"));
    }
    name
}

/// True when `name` can be used as an SQL identifier unquoted and unescaped.
pub fn plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbus_protocol::Message;

    #[test]
    fn a_table_template_renders_an_identifier_per_message() {
        let t = TableName::parse("metrics_{agent}_%Y").unwrap();
        assert!(t.is_template());
        let msg = Message::decode(
            "fleet/web-01.eu/telemetry/m",
            br#"{"ts":"2026-03-04T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(t.of(&msg), "\"metrics_web_01_eu_2026\"");
        let long = TableName::parse("{record.name}").unwrap();
        let name = "9".repeat(80);
        let msg = Message::decode("x", format!(r#"{{"name":"{name}"}}"#).as_bytes()).unwrap();
        let table = long.of(&msg);
        let bare = table.trim_matches('"');
        assert!(bare.starts_with("t_999") && bare.len() == 63, "{table}");
        assert!(plain_identifier(bare));
        // one table for names differing only in case, long ones too
        let upper = Message::decode(
            "x",
            format!(r#"{{"name":"{}"}}"#, "A".repeat(80)).as_bytes(),
        )
        .unwrap();
        let lower = Message::decode(
            "x",
            format!(r#"{{"name":"{}"}}"#, "a".repeat(80)).as_bytes(),
        )
        .unwrap();
        assert_eq!(long.of(&upper), long.of(&lower));
        // a keyword, in capitals: quoted and lowercase, the table `order` unquoted names
        let msg = Message::decode("x", br#"{"name":"ORDER"}"#).unwrap();
        assert_eq!(long.of(&msg), "\"order\"");
        for bad in ["metrics-{agent}", "a b{agent}", "{agnt}", "x;drop{agent}"] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            TableName::parse("plain").unwrap(),
            TableName::Fixed(_)
        ));
        assert!(TableName::parse("1plain").is_err());
    }

    /// Only the record itself has its key columns: a message a rule made and a dead letter
    /// (several of one record can exist) have NULL `epoch` and `seq`, so the unique key
    /// never drops one of them.
    #[test]
    fn only_the_record_itself_has_its_epoch_and_seq() {
        let msg = Message::decode(
            "fleet/a/telemetry/m",
            br#"{"seq":7,"epoch":3,"ts":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        let record = Item::new(1, msg.clone());
        let row = Row::of(&record).unwrap();
        assert_eq!((row.epoch, row.seq), (Some(3), Some(7)));
        let dead = Item::new(2, msg.clone()).with_dead_letter(fleetbus_wal::DeadLetter {
            sink: "rule:r".into(),
            error: "e".into(),
            attempts: 0,
            failed_at_ms: 0,
        });
        let row = Row::of(&dead).unwrap();
        assert_eq!((row.epoch, row.seq), (None, None));
        assert_eq!(row.agent.as_deref(), Some("a"));
        let mut made = Item::new(3, msg);
        std::sync::Arc::make_mut(&mut made.entry).produced = Some(fleetbus_wal::Produced {
            rule: "r".into(),
            part: 1,
        });
        let row = Row::of(&made).unwrap();
        assert_eq!(
            (row.epoch, row.seq, row.ts.as_deref()),
            (None, None, Some("2026-01-01T00:00:00Z"))
        );
    }
}
