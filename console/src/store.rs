//! The console's SQLite store: the rows, the silences, and the log position of the last
//! batch folded in (kept in the batch's own transaction, so a batch is folded once even
//! when the server crashed before it saved its position).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fleetbus_protocol::Event;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// What can go wrong with the console's store.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The database failed (with the file).
    #[error("event console {}: {what}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// No row with this id.
    #[error("no event {0}")]
    NotFound(i64),
    /// A request that cannot be carried out (closing a closed row, a silence naming
    /// nothing).
    #[error("{0}")]
    Request(String),
    /// A console kept in another database (PostgreSQL) failed, with what and where.
    #[error("event console {0}")]
    Remote(String),
}

/// One event to fold in.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The agent that raised it (the source).
    pub agent: String,
    /// When it happened.
    pub ts: DateTime<Utc>,
    /// The event.
    pub event: Event,
    /// The record's tags (the agent's cloud identity).
    pub tags: BTreeMap<String, String>,
    /// The agent's groups when the server accepted the record.
    pub groups: Vec<String>,
}

/// A check's latest result, as a record on stream `checks` carries it: what `fleetbus
/// agents show` lists as the agent's check states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckUpdate {
    /// The agent.
    pub agent: String,
    /// When the result was made.
    pub ts: DateTime<Utc>,
    /// The check's name.
    pub name: String,
    /// 0 OK to 3 UNKNOWN.
    pub status: u8,
    /// `soft` or `hard`.
    pub state_type: String,
    /// The plugin's first line.
    pub output: String,
}

/// A check's latest result as the console keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRow {
    /// The check's name.
    pub name: String,
    /// 0 OK to 3 UNKNOWN.
    pub status: u8,
    /// `soft` or `hard`.
    pub state_type: String,
    /// The plugin's first line.
    pub output: String,
    /// When the result was made.
    pub last: DateTime<Utc>,
}

/// A row's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowState {
    /// Needs attention.
    Open,
    /// Someone is on it (with a comment).
    Acknowledged,
    /// Over: recovered, or closed by an operator.
    Closed,
}

impl RowState {
    /// The state as stored (`open`, `acknowledged`, `closed`).
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Open => "open",
            RowState::Acknowledged => "acknowledged",
            RowState::Closed => "closed",
        }
    }

    /// The state stored as `s` (anything else: open).
    pub fn parse(s: &str) -> RowState {
        match s {
            "acknowledged" => RowState::Acknowledged,
            "closed" => RowState::Closed,
            _ => RowState::Open,
        }
    }
}

/// One folded row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    /// Its id.
    pub id: i64,
    /// The event class.
    pub class: String,
    /// The agent (source).
    pub agent: String,
    /// The rule or check.
    pub rule: Option<String>,
    /// The event's group.
    pub group: Option<String>,
    /// The agent's groups (as of its latest event).
    pub agent_groups: Vec<String>,
    /// The resources (type-name pairs).
    pub resources: Vec<fleetbus_protocol::Resource>,
    /// The latest severity, 1-5.
    pub severity: u8,
    /// Open, acknowledged or closed.
    pub state: RowState,
    /// How many events folded into it.
    pub count: u64,
    /// The first event's time.
    pub first: DateTime<Utc>,
    /// The latest event's time.
    pub last: DateTime<Utc>,
    /// The latest event's text.
    pub text: String,
    /// The agent's tags (its cloud identity) as of its latest event.
    pub tags: BTreeMap<String, String>,
    /// The silence that covered its latest event, if one did.
    pub silenced_by: Option<i64>,
    /// The comment of the latest change (acknowledgement, close; a recovery's text).
    pub comment: Option<String>,
    /// Who made the latest change (`recovery` for a clearing event).
    pub changed_by: Option<String>,
    /// When it was closed.
    pub closed: Option<DateTime<Utc>>,
}

/// Which rows to list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Filter {
    /// Only rows not closed.
    pub open: bool,
    /// Only rows of at least this severity.
    pub min_severity: Option<u8>,
    /// Only this agent's rows.
    pub agent: Option<String>,
    /// Only rows of this group (the event's group or one of the agent's).
    pub group: Option<String>,
    /// Rows whose latest event a silence covered too.
    pub silenced: bool,
    /// At most this many, the latest first (default 100, at most 10,000).
    pub limit: Option<u32>,
}

/// A value a listing's conditions compare with.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    /// A number.
    Int(i64),
    /// A text.
    Text(String),
}

impl Filter {
    /// The listing as SQL after `FROM console_events`: its conditions, order and limit,
    /// with the values of its placeholders. `mark(n)` writes placeholder `n` (from 1:
    /// `?1`, `$1`); `member(m)` tests whether placeholder text `m` is one of the row's
    /// `agent_groups` in the database's JSON functions.
    pub fn to_sql(
        &self,
        mark: impl Fn(usize) -> String,
        member: impl Fn(&str) -> String,
    ) -> (String, Vec<FilterValue>) {
        let mut sql = String::from(" WHERE true");
        let mut values = Vec::new();
        if self.open {
            sql.push_str(" AND state <> 'closed'");
        }
        if !self.silenced {
            sql.push_str(" AND silenced_by IS NULL");
        }
        if let Some(s) = self.min_severity {
            values.push(FilterValue::Int(i64::from(s)));
            sql.push_str(&format!(" AND severity >= {}", mark(values.len())));
        }
        if let Some(a) = &self.agent {
            values.push(FilterValue::Text(a.clone()));
            sql.push_str(&format!(" AND agent = {}", mark(values.len())));
        }
        if let Some(g) = &self.group {
            values.push(FilterValue::Text(g.clone()));
            let m = mark(values.len());
            sql.push_str(&format!(" AND (grp = {m} OR {})", member(&m)));
        }
        let limit = self.limit.unwrap_or(100).min(MAX_LIST);
        sql.push_str(&format!(" ORDER BY last_ms DESC, id DESC LIMIT {limit}"));
        (sql, values)
    }
}

/// A silence to add: events matching all it names, until it expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// Only this agent's events.
    #[serde(default)]
    pub agent: Option<String>,
    /// Only this rule's (or check's) events.
    #[serde(default)]
    pub rule: Option<String>,
    /// Only events of this group (the event's, or one of the agent's).
    #[serde(default)]
    pub group: Option<String>,
    /// How long it lasts.
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

impl Silence {
    /// When a silence made at `now` ends; refused if it names nothing or lasts no time.
    pub fn until(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>, ConsoleError> {
        if self.agent.is_none() && self.rule.is_none() && self.group.is_none() {
            return Err(ConsoleError::Request(
                "a silence names an agent, a rule or a group (or several)".into(),
            ));
        }
        if self.duration.is_zero() {
            return Err(ConsoleError::Request("a silence lasts more than 0s".into()));
        }
        Ok(now + chrono::Duration::from_std(self.duration).unwrap_or(chrono::Duration::MAX))
    }
}

/// A silence as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SilenceRow {
    /// Its id.
    pub id: i64,
    /// The agent it names.
    pub agent: Option<String>,
    /// The rule it names.
    pub rule: Option<String>,
    /// The group it names.
    pub group: Option<String>,
    /// When it ends.
    pub until: DateTime<Utc>,
    /// Why.
    pub comment: String,
    /// Who made it.
    pub created_by: String,
}

mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS console_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fold_key TEXT NOT NULL,
    class TEXT NOT NULL, agent TEXT NOT NULL, rule TEXT, grp TEXT,
    agent_groups TEXT NOT NULL, resources TEXT NOT NULL,
    severity INTEGER NOT NULL, state TEXT NOT NULL,
    count INTEGER NOT NULL, first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL,
    text TEXT NOT NULL, tags TEXT NOT NULL, silenced_by INTEGER,
    comment TEXT, changed_by TEXT, changed_ms INTEGER, closed_ms INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS console_one_live_row
    ON console_events (fold_key) WHERE state != 'closed';
CREATE INDEX IF NOT EXISTS console_by_last ON console_events (last_ms);
CREATE INDEX IF NOT EXISTS console_by_agent ON console_events (agent) WHERE state != 'closed';
CREATE INDEX IF NOT EXISTS console_closed ON console_events (closed_ms) WHERE state = 'closed';
CREATE TABLE IF NOT EXISTS console_silences (
    id INTEGER PRIMARY KEY AUTOINCREMENT, agent TEXT, rule TEXT, grp TEXT,
    until_ms INTEGER NOT NULL, comment TEXT NOT NULL, created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS console_positions (sink TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS console_checks (
    agent TEXT NOT NULL, name TEXT NOT NULL, status INTEGER NOT NULL, state_type TEXT NOT NULL,
    output TEXT NOT NULL, last_ms INTEGER NOT NULL, PRIMARY KEY (agent, name));
";

/// The most rows one listing returns.
pub const MAX_LIST: u32 = 10_000;

/// Open rows one agent may have unless configured otherwise ([`Console::with_limit`]).
pub const DEFAULT_MAX_OPEN_PER_AGENT: u32 = 1_000;

/// The class of the row an agent's events fold into once it has its limit of open rows.
pub const OVERFLOW_CLASS: &str = "fleetbus.console.overflow";

/// The console's store (one connection; SQLite in WAL mode, so the admin endpoint and the
/// sink each open their own).
pub struct Console {
    db: Connection,
    path: PathBuf,
    max_open_per_agent: u32,
}

/// A time as the console's tables keep it: milliseconds since the epoch.
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// A time the console's tables kept (out of range: the epoch).
pub fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// The fold key: class, source, rule and resources.
pub fn fold_key(agent: &str, event: &Event) -> String {
    let resources: Vec<String> = event
        .resources
        .iter()
        .map(|r| format!("{}={}", r.kind, r.name))
        .collect();
    format!(
        "{}\u{1f}{agent}\u{1f}{}\u{1f}{}",
        event.class,
        event.rule.as_deref().unwrap_or_default(),
        resources.join("/")
    )
}

impl Console {
    /// Opens (creating) the console at `path`.
    pub fn open(path: &Path) -> Result<Console, ConsoleError> {
        let fail = |what, source| ConsoleError::Db {
            path: path.to_path_buf(),
            what,
            source,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Connection::open(path).map_err(|e| fail("open", e))?;
        db.busy_timeout(Duration::from_secs(5))
            .map_err(|e| fail("busy_timeout", e))?;
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| fail("journal_mode = WAL", e))?;
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| fail("synchronous = FULL", e))?;
        db.execute_batch(SCHEMA)
            .map_err(|e| fail("create tables", e))?;
        Ok(Console {
            db,
            path: path.to_path_buf(),
            max_open_per_agent: DEFAULT_MAX_OPEN_PER_AGENT,
        })
    }

    /// Bounds the open rows of one agent: an event that would open one more row folds
    /// instead into the agent's one [`OVERFLOW_CLASS`] row (severity 3, its text saying
    /// what was folded there), so one agent raising endless distinct events cannot grow
    /// the console without bound.
    pub fn with_limit(mut self, max_open_per_agent: u32) -> Console {
        self.max_open_per_agent = max_open_per_agent.max(1);
        self
    }

    fn fail(&self, what: &'static str) -> impl Fn(rusqlite::Error) -> ConsoleError {
        db_error(&self.path, what)
    }

    /// The log position after the last batch `sink` folded in (0: none).
    pub fn position(&self, sink: &str) -> Result<u64, ConsoleError> {
        let next: Option<i64> = self
            .db
            .query_row(
                "SELECT next FROM console_positions WHERE sink = ?1",
                params![sink],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.fail("read the position"))?;
        Ok(next.unwrap_or(0).max(0) as u64)
    }

    /// [`Console::fold_with`] without check results.
    pub fn fold(
        &mut self,
        sink: &str,
        events: &[(u64, Incoming)],
        next: u64,
    ) -> Result<(), ConsoleError> {
        self.fold_with(sink, events, &[], next)
    }

    /// Folds `events` in and keeps `checks` as their checks' latest results (each with
    /// its log index), and saves `next` as `sink`'s position, in one transaction. Entries at
    /// indexes the console already took are skipped.
    pub fn fold_with(
        &mut self,
        sink: &str,
        events: &[(u64, Incoming)],
        checks: &[(u64, CheckUpdate)],
        next: u64,
    ) -> Result<(), ConsoleError> {
        let path = self.path.clone();
        let fail = |what| db_error(&path, what);
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(fail("begin"))?;
        let done: i64 = tx
            .query_row(
                "SELECT next FROM console_positions WHERE sink = ?1",
                params![sink],
                |r| r.get(0),
            )
            .optional()
            .map_err(fail("read the position"))?
            .unwrap_or(0);
        for (index, e) in events {
            if (*index as i64) < done {
                continue;
            }
            fold_one(&tx, e, self.max_open_per_agent).map_err(fail("fold an event"))?;
        }
        for (index, c) in checks {
            if (*index as i64) < done {
                continue;
            }
            keep_check(&tx, c, self.max_open_per_agent).map_err(fail("keep a check's result"))?;
        }
        tx.execute(
            "INSERT INTO console_positions (sink, next) VALUES (?1, ?2)
             ON CONFLICT (sink) DO UPDATE SET next = max(next, excluded.next)",
            params![sink, next as i64],
        )
        .map_err(fail("save the position"))?;
        tx.commit().map_err(fail("commit"))
    }

    /// The rows `filter` asks for, the latest first.
    pub fn list(&self, filter: &Filter) -> Result<Vec<EventRow>, ConsoleError> {
        use rusqlite::types::Value;
        let (conditions, values) = filter.to_sql(
            |n| format!("?{n}"),
            |m| format!("EXISTS (SELECT 1 FROM json_each(agent_groups) WHERE value = {m})"),
        );
        let sql = format!("SELECT * FROM console_events{conditions}");
        let args: Vec<Value> = values
            .into_iter()
            .map(|v| match v {
                FilterValue::Int(n) => Value::Integer(n),
                FilterValue::Text(t) => Value::Text(t),
            })
            .collect();
        let mut stmt = self.db.prepare(&sql).map_err(self.fail("list"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), row_of)
            .map_err(self.fail("list"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.fail("list"))?;
        Ok(rows)
    }

    /// `agent`'s checks, each with its latest result, by name.
    pub fn checks(&self, agent: &str) -> Result<Vec<CheckRow>, ConsoleError> {
        let mut stmt = self
            .db
            .prepare_cached(
                "SELECT name, status, state_type, output, last_ms FROM console_checks
                 WHERE agent = ?1 ORDER BY name",
            )
            .map_err(self.fail("list checks"))?;
        let rows = stmt
            .query_map(params![agent], |r| {
                Ok(CheckRow {
                    name: r.get(0)?,
                    status: r.get(1)?,
                    state_type: r.get(2)?,
                    output: r.get(3)?,
                    last: time(r.get(4)?),
                })
            })
            .map_err(self.fail("list checks"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.fail("list checks"))?;
        Ok(rows)
    }

    /// One row.
    pub fn get(&self, id: i64) -> Result<EventRow, ConsoleError> {
        self.db
            .query_row(
                "SELECT * FROM console_events WHERE id = ?1",
                params![id],
                row_of,
            )
            .optional()
            .map_err(self.fail("read"))?
            .ok_or(ConsoleError::NotFound(id))
    }

    /// Acknowledges an open row, by `who`, with `comment`.
    pub fn acknowledge(
        &mut self,
        id: i64,
        comment: &str,
        who: &str,
    ) -> Result<EventRow, ConsoleError> {
        self.change(id, RowState::Acknowledged, comment, who)
    }

    /// Closes a row, by `who`, with `comment`.
    pub fn close(&mut self, id: i64, comment: &str, who: &str) -> Result<EventRow, ConsoleError> {
        self.change(id, RowState::Closed, comment, who)
    }

    fn change(
        &mut self,
        id: i64,
        to: RowState,
        comment: &str,
        who: &str,
    ) -> Result<EventRow, ConsoleError> {
        let row = self.get(id)?;
        if row.state == RowState::Closed {
            return Err(ConsoleError::Request(format!(
                "event {id} is closed already"
            )));
        }
        let now = ms(Utc::now());
        self.db
            .execute(
                "UPDATE console_events SET state = ?2, comment = ?3, changed_by = ?4, changed_ms = ?5,
                 closed_ms = CASE WHEN ?2 = 'closed' THEN ?5 ELSE closed_ms END WHERE id = ?1",
                params![id, to.as_str(), comment, who, now],
            )
            .map_err(self.fail("change a row"))?;
        self.get(id)
    }

    /// Adds a silence (by `who`); the rows open now that it covers are marked silenced too.
    pub fn silence(&mut self, s: &Silence, who: &str) -> Result<SilenceRow, ConsoleError> {
        let now = Utc::now();
        let until = s.until(now)?;
        let path = self.path.clone();
        let fail = |what| db_error(&path, what);
        let tx = self.db.transaction().map_err(fail("begin"))?;
        tx.execute(
            "INSERT INTO console_silences (agent, rule, grp, until_ms, comment, created_by, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![s.agent, s.rule, s.group, ms(until), s.comment, who, ms(now)],
        )
        .map_err(fail("add a silence"))?;
        let id = tx.last_insert_rowid();
        tx.execute(
            &format!(
                "UPDATE console_events SET silenced_by = ?1 WHERE state != 'closed' AND {}",
                COVERS_ROW
            ),
            params![id, s.agent, s.rule, s.group],
        )
        .map_err(fail("mark the rows it covers"))?;
        tx.commit().map_err(fail("commit"))?;
        Ok(SilenceRow {
            id,
            agent: s.agent.clone(),
            rule: s.rule.clone(),
            group: s.group.clone(),
            until,
            comment: s.comment.clone(),
            created_by: who.to_string(),
        })
    }

    /// The silences not expired at `now`.
    pub fn silences(&self, now: DateTime<Utc>) -> Result<Vec<SilenceRow>, ConsoleError> {
        let mut stmt = self
            .db
            .prepare(
                "SELECT id, agent, rule, grp, until_ms, comment, created_by FROM console_silences
                 WHERE until_ms > ?1 ORDER BY id",
            )
            .map_err(self.fail("list silences"))?;
        let rows = stmt
            .query_map(params![ms(now)], |r| {
                Ok(SilenceRow {
                    id: r.get(0)?,
                    agent: r.get(1)?,
                    rule: r.get(2)?,
                    group: r.get(3)?,
                    until: time(r.get(4)?),
                    comment: r.get(5)?,
                    created_by: r.get(6)?,
                })
            })
            .map_err(self.fail("list silences"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.fail("list silences"))?;
        Ok(rows)
    }

    /// Deletes rows closed before `before`, and silences expired before it; how many rows.
    pub fn purge(&mut self, before: DateTime<Utc>) -> Result<usize, ConsoleError> {
        let n = self
            .db
            .execute(
                "DELETE FROM console_events WHERE state = 'closed' AND closed_ms < ?1",
                params![ms(before)],
            )
            .map_err(self.fail("purge closed rows"))?;
        self.db
            .execute(
                "DELETE FROM console_silences WHERE until_ms < ?1",
                params![ms(before)],
            )
            .map_err(self.fail("purge expired silences"))?;
        Ok(n)
    }
}

/// Keeps `c` as its check's latest result (an older one than kept changes nothing). An
/// agent has at most `max_checks` checks kept: results of more are not.
fn keep_check(
    tx: &rusqlite::Transaction<'_>,
    c: &CheckUpdate,
    max_checks: u32,
) -> rusqlite::Result<()> {
    let known: bool = tx
        .prepare_cached("SELECT 1 FROM console_checks WHERE agent = ?1 AND name = ?2")?
        .exists(params![c.agent, c.name])?;
    if !known {
        let kept: i64 = tx
            .prepare_cached("SELECT count(*) FROM console_checks WHERE agent = ?1")?
            .query_row(params![c.agent], |r| r.get(0))?;
        if kept >= i64::from(max_checks) {
            return Ok(());
        }
    }
    tx.prepare_cached(
        "INSERT INTO console_checks (agent, name, status, state_type, output, last_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (agent, name) DO UPDATE SET status = excluded.status,
             state_type = excluded.state_type, output = excluded.output, last_ms = excluded.last_ms
         WHERE excluded.last_ms >= console_checks.last_ms",
    )?
    .execute(params![
        c.agent,
        c.name,
        c.status,
        c.state_type,
        c.output,
        ms(c.ts)
    ])?;
    Ok(())
}

/// The event an agent's event `e` becomes when the agent has `max_open` open rows
/// already: one of its overflow row.
pub fn overflow_event(e: &Incoming, max_open: u32) -> Event {
    Event {
        class: OVERFLOW_CLASS.into(),
        severity: fleetbus_protocol::Severity::WARNING,
        rule: None,
        group: None,
        resources: Vec::new(),
        text: format!(
            "{} has {max_open} open events (the console's limit per agent): events of new kinds fold here; the latest: {} {}: {}",
            e.agent,
            e.event.class,
            e.event.rule.as_deref().unwrap_or(""),
            e.event.text
        ),
        clear: false,
    }
}

/// Whether a silence (parameters 2-4: agent, rule, group; each NULL for any) covers a row.
const COVERS_ROW: &str = "(?2 IS NULL OR agent = ?2) AND (?3 IS NULL OR rule = ?3)
     AND (?4 IS NULL OR grp = ?4 OR EXISTS (SELECT 1 FROM json_each(agent_groups) WHERE value = ?4))";

fn fold_one(tx: &rusqlite::Transaction<'_>, e: &Incoming, max_open: u32) -> rusqlite::Result<()> {
    let mut key = fold_key(&e.agent, &e.event);
    let at = ms(e.ts);
    if e.event.clear {
        tx.execute(
            "UPDATE console_events SET state = 'closed', closed_ms = ?2, changed_ms = ?2,
             changed_by = 'recovery', comment = ?3, last_ms = max(last_ms, ?2)
             WHERE fold_key = ?1 AND state != 'closed'",
            params![key, at, e.event.text],
        )?;
        return Ok(());
    }
    let open_row: Option<i64> = tx
        .prepare_cached("SELECT id FROM console_events WHERE fold_key = ?1 AND state != 'closed'")?
        .query_row(params![key], |r| r.get(0))
        .optional()?;
    let overflow;
    let mut ev: &Event = &e.event;
    if open_row.is_none() {
        let open: i64 = tx
            .prepare_cached(
                "SELECT count(*) FROM console_events WHERE agent = ?1 AND state != 'closed'",
            )?
            .query_row(params![e.agent], |r| r.get(0))?;
        if open >= i64::from(max_open) {
            // this agent has its limit of open rows: one more distinct event folds into
            // its overflow row
            overflow = overflow_event(e, max_open);
            key = fold_key(&e.agent, &overflow);
            ev = &overflow;
        }
    }
    let groups = serde_json::to_string(&e.groups).unwrap_or_else(|_| "[]".into());
    let silence: Option<i64> = tx
        .query_row(
            "SELECT id FROM console_silences WHERE until_ms > ?1
             AND (agent IS NULL OR agent = ?2) AND (rule IS NULL OR rule = ?3)
             AND (grp IS NULL OR grp = ?4 OR grp IN (SELECT value FROM json_each(?5)))
             ORDER BY id LIMIT 1",
            params![at, e.agent, ev.rule, ev.group, groups],
            |r| r.get(0),
        )
        .optional()?;
    let resources = serde_json::to_string(&ev.resources).unwrap_or_else(|_| "[]".into());
    let tags = serde_json::to_string(&e.tags).unwrap_or_else(|_| "{}".into());
    tx.prepare_cached(
        "INSERT INTO console_events (fold_key, class, agent, rule, grp, agent_groups, resources,
             severity, state, count, first_ms, last_ms, text, tags, silenced_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'open', 1, ?9, ?9, ?10, ?11, ?12)
         ON CONFLICT (fold_key) WHERE state != 'closed' DO UPDATE SET
             count = count + 1,
             first_ms = min(first_ms, excluded.first_ms),
             severity = CASE WHEN excluded.last_ms >= last_ms THEN excluded.severity ELSE severity END,
             text = CASE WHEN excluded.last_ms >= last_ms THEN excluded.text ELSE text END,
             tags = CASE WHEN excluded.last_ms >= last_ms THEN excluded.tags ELSE tags END,
             agent_groups = excluded.agent_groups,
             silenced_by = excluded.silenced_by,
             last_ms = max(last_ms, excluded.last_ms)",
    )?
    .execute(params![
        key,
        ev.class,
        e.agent,
        ev.rule,
        ev.group,
        groups,
        resources,
        ev.severity.level(),
        at,
        ev.text,
        tags,
        silence
    ])?;
    Ok(())
}

/// A JSON column's value (a column the console wrote itself; unreadable: empty).
pub fn json<T: serde::de::DeserializeOwned + Default>(text: String) -> T {
    serde_json::from_str(&text).unwrap_or_default()
}

/// Maps a SQLite error of `what` on the database at `path`.
fn db_error(path: &Path, what: &'static str) -> impl Fn(rusqlite::Error) -> ConsoleError {
    let path = path.to_path_buf();
    move |source| ConsoleError::Db {
        path: path.clone(),
        what,
        source,
    }
}

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get("id")?,
        class: r.get("class")?,
        agent: r.get("agent")?,
        rule: r.get("rule")?,
        group: r.get("grp")?,
        agent_groups: json(r.get("agent_groups")?),
        resources: json(r.get("resources")?),
        severity: r.get("severity")?,
        state: RowState::parse(&r.get::<_, String>("state")?),
        count: r.get::<_, i64>("count")?.max(0) as u64,
        first: time(r.get("first_ms")?),
        last: time(r.get("last_ms")?),
        text: r.get("text")?,
        tags: json(r.get("tags")?),
        silenced_by: r.get("silenced_by")?,
        comment: r.get("comment")?,
        changed_by: r.get("changed_by")?,
        closed: r.get::<_, Option<i64>>("closed_ms")?.map(time),
    })
}

#[cfg(test)]
mod tests;
