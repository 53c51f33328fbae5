//! The SQLite sink: one row per message in a table of an SQLite database, the embedded
//! default database for a single server.
//!
//! The layout is one row per message with its key columns and the message as JSON:
//!
//! ```sql
//! CREATE TABLE messages (agent TEXT, stream TEXT, epoch INTEGER, seq INTEGER, ts TEXT,
//!     topic TEXT NOT NULL, received TEXT NOT NULL, message TEXT NOT NULL,
//!     UNIQUE (agent, stream, epoch, seq))
//! ```
//!
//! With `columns` ([`crate::columns`]) the `message` column gives way to computed ones,
//! each value bound with its own type. A templated `table` (`metrics_{agent}`,
//! [`crate::row::TableName`]) puts each message in the table its fields name, made with
//! `create_table` in the transaction of the first batch that names it.
//!
//! Exactly once, twice over: a record's (agent, stream, epoch, seq) is unique and inserted
//! with `ON CONFLICT DO NOTHING`, so a replayed or retried batch never duplicates it; and
//! each batch commits, in the same transaction as its rows, the log position after it in
//! `fleetbus_sink_positions`, so after a crash the sink resumes after the last batch the
//! database holds (this also covers messages without a record key: job events, file
//! completions, presence).
//!
//! One connection per sink, in WAL journal mode with `synchronous = FULL` (a committed batch
//! survives a power loss: the sink's saved position is never ahead of the database). Its
//! blocking calls run on tokio's blocking pool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbus_config::Problems;
use fleetbus_protocol::Message;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::columns::{Cell, Computed};
use crate::config::{SinkPlace, SinkType};
use crate::row::{check_table, Row, TableName, POSITIONS, TABLES_REMEMBERED};
use crate::{Batch, BoxFuture, Sink, SinkError};

/// `type = "sqlite"`: rows in a table of an SQLite database file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// The database file (created if missing); relative paths are under the server's
    /// `data_dir`.
    pub path: PathBuf,
    /// The table the rows go to.
    #[serde(default = "crate::row::default_table")]
    pub table: String,
    /// Create the table (and its unique key) when it is missing. Off, a missing table is
    /// an error the sink retries until an operator creates it.
    #[serde(default = "crate::row::default_create_table")]
    pub create_table: bool,
    /// How long a write waits for another connection's lock on the database before the
    /// batch is retried.
    #[serde(default = "default_busy_timeout", with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// Computed columns (name → CEL expression) instead of the `message` column: a typed
    /// layout ([`crate::columns`]).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

fn default_busy_timeout() -> Duration {
    Duration::from_secs(5)
}

impl SinkType for SqliteSinkConfig {
    fn check(&self, p: &mut Problems) {
        p.require(
            !self.path.as_os_str().is_empty(),
            "path",
            "is empty: name the database file",
        );
        check_table(&self.table, p);
        p.require(
            self.busy_timeout <= Duration::from_secs(60),
            "busy_timeout",
            "must be at most 60s (the sink's writes wait this long on a locked database)",
        );
        crate::columns::check(&self.columns, p);
    }

    fn file_destination(&self, _: &Message) -> Option<String> {
        Some(format!(
            "sqlite {} table {}",
            self.path.display(),
            self.table
        ))
    }

    fn computed_columns(&self) -> Option<&BTreeMap<String, String>> {
        Some(&self.columns)
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        let path = place.data_dir.join(&self.path);
        Ok(Box::new(SqliteSink {
            inner: Arc::new(Inner {
                name: place.name.to_string(),
                path,
                computed: Computed::compile(&self.columns)?,
                config: self.clone(),
                connection: Mutex::new(None),
                table: TableName::parse(&self.table).map_err(SinkError::Config)?,
                created: Mutex::new(std::collections::HashSet::new()),
            }),
        }))
    }
}

/// Writes batches into an SQLite table (see the module documentation).
pub struct SqliteSink {
    inner: Arc<Inner>,
}

/// What the sink's blocking calls share.
struct Inner {
    name: String,
    path: PathBuf,
    config: SqliteSinkConfig,
    /// The computed columns, if the layout has them.
    computed: Option<Arc<Computed>>,
    /// Opened at the first use and again after an error that may have broken it.
    connection: Mutex<Option<Connection>>,
    /// The table, or the template of the tables.
    table: TableName,
    /// With a template and `create_table`: the tables made (or found) so far, at most
    /// [`TABLES_REMEMBERED`] (then forgotten, and made again `IF NOT EXISTS`).
    created: Mutex<std::collections::HashSet<String>>,
}

/// Whether a database error can never be fixed by writing the row again: the row breaks a
/// constraint or a type the table declares, or is too big.
fn refuses_the_row(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig)
    )
}

impl Inner {
    fn remote(&self, what: &str, e: impl std::fmt::Display) -> SinkError {
        SinkError::Remote(format!("sqlite {}: {what}: {e}", self.path.display()))
    }

    /// Opens the database with the sink's settings, creating the tables it needs.
    fn open(&self) -> Result<Connection, SinkError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SinkError::io(dir, "create directory", e))?;
        }
        let conn = Connection::open(&self.path).map_err(|e| self.remote("open", e))?;
        conn.busy_timeout(self.config.busy_timeout)
            .map_err(|e| self.remote("busy_timeout", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| self.remote("journal_mode = WAL", e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.remote("synchronous = FULL", e))?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {POSITIONS} (sink TEXT NOT NULL, tbl TEXT NOT NULL, \
             next INTEGER NOT NULL, PRIMARY KEY (sink, tbl))"
        ))
        .map_err(|e| self.remote("create the positions table", e))?;
        if let (true, TableName::Fixed(t)) = (self.config.create_table, &self.table) {
            conn.execute_batch(&self.create_table(t))
                .map_err(|e| self.remote(&format!("create table {t}"), e))?;
        }
        Ok(conn)
    }

    /// The statement that creates table `t` in the sink's layout, if it is missing.
    fn create_table(&self, t: &str) -> String {
        // computed columns without a declared type: each value keeps its own
        let payload = match &self.computed {
            Some(c) => c.names().collect::<Vec<_>>().join(", "),
            None => "message TEXT NOT NULL".to_string(),
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (agent TEXT, stream TEXT, epoch INTEGER, \
             seq INTEGER, ts TEXT, topic TEXT NOT NULL, received TEXT NOT NULL, \
             {payload}, UNIQUE (agent, stream, epoch, seq))"
        )
    }
}

impl SqliteSink {
    /// Runs `f` with the open connection on the blocking pool. A connection that failed
    /// with a retryable error is closed, so the next attempt opens it afresh.
    async fn with_connection<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Connection) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let me = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = me.connection.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(me.open()?);
            }
            let Some(conn) = guard.as_mut() else {
                return Err(me.remote("open", "no connection"));
            };
            let result = f(&me, conn);
            if matches!(&result, Err(e) if e.class() == crate::ErrorClass::Retryable) {
                *guard = None;
            }
            result
        })
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
    }
}

/// A message's table and row, or why it cannot be one.
type TableRow = Result<(String, Row), SinkError>;

/// Inserts `rows` and the position `next` in one transaction. A row the table refuses
/// rolls the whole batch back and is named (with the others it refuses), so the worker
/// dead-letters exactly those and writes the rest again.
fn insert(
    sink: &Inner,
    conn: &mut Connection,
    rows: &[(u64, TableRow)],
    next: u64,
) -> Result<(), SinkError> {
    // the position is kept under the table as configured (a template's text)
    let table = &sink.config.table;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| sink.remote("begin", e))?;
    // rows of log entries before this are in the table already (a batch committed just
    // before a crash, whose position the worker had not saved yet)
    let done: i64 = tx
        .query_row(
            &format!("SELECT next FROM {POSITIONS} WHERE sink = ?1 AND tbl = ?2"),
            params![sink.name, table],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| sink.remote("read the position", e))?
        .unwrap_or(0);
    let mut refused = Vec::new();
    let mut first_refusal = None;
    // tables a template named for the first time, made in this transaction
    let mut made: Vec<String> = Vec::new();
    {
        let (payload, values) = match &sink.computed {
            Some(c) => {
                let names: Vec<&str> = c.names().collect();
                let marks: Vec<String> = (0..c.len()).map(|n| format!("?{}", n + 8)).collect();
                (names.join(", "), marks.join(", "))
            }
            None => ("message".to_string(), "?8".to_string()),
        };
        let make_tables = sink.config.create_table && sink.table.is_template();
        for (n, (index, row)) in rows.iter().enumerate() {
            if (*index as i64) < done {
                continue;
            }
            let (table, row) = match row {
                Ok(row) => row,
                Err(e) => {
                    refused.push(n);
                    first_refusal.get_or_insert_with(|| e.to_string());
                    continue;
                }
            };
            // a table a template names for the first time is made in this transaction
            if make_tables
                && !made.contains(table)
                && !sink
                    .created
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(table)
            {
                tx.execute_batch(&sink.create_table(table))
                    .map_err(|e| sink.remote(&format!("create table {table}"), e))?;
                made.push(table.clone());
            }
            // one prepared statement per table, cached by the connection
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO {table} (agent, stream, epoch, seq, ts, topic, received, {payload}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, {values}) ON CONFLICT DO NOTHING"
                ))
                .map_err(|e| sink.remote(&format!("insert into {table}"), e))?;
            let inserted = stmt.execute(rusqlite::params_from_iter(values_of(
                row,
                sink.computed.is_some(),
            )));
            match inserted {
                Ok(_) => {}
                Err(e) if refuses_the_row(&e) => {
                    refused.push(n);
                    first_refusal
                        .get_or_insert_with(|| format!("table {table} refuses the row: {e}"));
                }
                Err(e) => return Err(sink.remote(&format!("insert into {table}"), e)),
            }
        }
    }
    if !refused.is_empty() {
        // dropping the transaction rolls it back
        return Err(SinkError::Rejected {
            items: refused,
            error: Box::new(SinkError::Refused(format!(
                "sqlite {}: {}",
                sink.path.display(),
                first_refusal.unwrap_or_default()
            ))),
        });
    }
    let next = i64::try_from(next).map_err(|e| sink.remote("position", e))?;
    tx.execute(
        &format!(
            "INSERT INTO {POSITIONS} (sink, tbl, next) VALUES (?1, ?2, ?3) \
             ON CONFLICT (sink, tbl) DO UPDATE SET next = max(next, excluded.next)"
        ),
        params![sink.name, table, next],
    )
    .map_err(|e| sink.remote("save the position", e))?;
    tx.commit().map_err(|e| sink.remote("commit", e))?;
    // noted as made only now: a creation rolled back with its batch is made again
    let mut created = sink.created.lock().unwrap_or_else(|p| p.into_inner());
    if created.len() + made.len() > TABLES_REMEMBERED {
        created.clear();
    }
    created.extend(made);
    Ok(())
}

/// The parameters of `row`'s insert: the key columns, then the message or the computed
/// columns.
fn values_of(row: &Row, computed: bool) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    let text = |s: &Option<String>| s.clone().map_or(Value::Null, Value::Text);
    let int = |n: Option<i64>| n.map_or(Value::Null, Value::Integer);
    let mut values = vec![
        text(&row.agent),
        text(&row.stream),
        int(row.epoch),
        int(row.seq),
        text(&row.ts),
        Value::Text(row.topic.clone()),
        Value::Text(
            row.received
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    ];
    if !computed {
        values.push(Value::Text(row.message.clone()));
        return values;
    }
    values.extend(row.computed.iter().map(|cell| match cell {
        Cell::Null => Value::Null,
        Cell::Bool(b) => Value::Integer(i64::from(*b)),
        Cell::Int(n) => Value::Integer(*n),
        Cell::Float(x) => Value::Real(*x),
        Cell::Text(s) | Cell::Json(s) => Value::Text(s.clone()),
    }));
    values
}

impl Sink for SqliteSink {
    fn writes_json(&self) -> bool {
        // computed columns replace the message's JSON
        self.inner.computed.is_none()
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let computed = self.inner.computed.as_deref();
            let table = &self.inner.table;
            let rows: Vec<(u64, TableRow)> = batch
                .items
                .iter()
                .map(|item| {
                    let row = Row::with(item, computed)
                        .and_then(|row| Ok((table.of(item.message()?), row)));
                    (item.index, row)
                })
                .collect();
            let next = batch.next;
            self.with_connection(move |sink, conn| insert(sink, conn, &rows, next))
                .await
        })
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        Box::pin(async move {
            let stored = self
                .with_connection(|sink, conn| {
                    conn.query_row(
                        &format!("SELECT next FROM {POSITIONS} WHERE sink = ?1 AND tbl = ?2"),
                        params![sink.name, sink.config.table],
                        |r| r.get::<_, i64>(0),
                    )
                    .optional()
                    .map_err(|e| sink.remote("read the position", e))
                })
                .await;
            match stored {
                Ok(stored) => Ok(stored.map_or(saved, |s| saved.max(s.max(0) as u64))),
                Err(e) => {
                    // unreachable now: start from the saved position; each write skips
                    // the entries the database already holds
                    tracing::warn!(sink = %self.inner.name, error = %e, "sqlite sink: database not reachable at start; retrying with every write");
                    Ok(saved)
                }
            }
        })
    }

    fn exactly_once(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
