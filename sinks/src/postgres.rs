//! The PostgreSQL sink: one row per message in a PostgreSQL table, in the default layout of
//! [`crate::row`] with `ts` and `received` as `timestamptz` and the message as `jsonb`:
//!
//! ```sql
//! CREATE TABLE messages (agent text, stream text, epoch bigint, seq bigint,
//!     ts timestamptz, topic text NOT NULL, received timestamptz NOT NULL,
//!     message jsonb NOT NULL, UNIQUE (agent, stream, epoch, seq))
//! ```
//!
//! With `columns` ([`crate::columns`]) the `message` column gives way to computed ones,
//! each value sent as text and cast to its column's type (`jsonb` when the sink makes the
//! table). A templated `table` (`metrics_{agent}`, [`crate::row::TableName`]) puts each
//! message in the table its fields name: a batch's rows are grouped by table and all
//! written in its one transaction, a table made there (with `create_table`) by the first
//! batch that names it, and each table's columns read once (what they allow kept).
//!
//! **Exactly once**, as in the SQLite sink: the unique record key with `ON CONFLICT DO
//! NOTHING` (a replayed or retried batch never duplicates a record), and the log position
//! after each batch committed in the same transaction in `fleetbus_sink_positions`, so a
//! write skips the entries the database already holds (this also covers messages without a
//! record key).
//!
//! **Batched**: a batch is one `COPY ... FROM STDIN BINARY` when the table's columns have
//! the default layout's types (the fast path: no text to parse, no casts), else one
//! `INSERT ... SELECT ... FROM unnest($1, ..., $N)` with one array per column (a prepared
//! statement cached per connection, PostgreSQL casting each value to the table's types).
//! Either is a plain insert first: when it meets a row already in the table (SQLSTATE
//! 23505), the batch is inserted again with `ON CONFLICT DO NOTHING`, so the usual case
//! does not pay for conflict checks.
//!
//! **Errors classified** by SQLSTATE:
//! - a row the table refuses (class 22 data exception, 23 integrity constraint violation,
//!   54 program limit exceeded) is permanent: `COPY` names the row, and only it goes to the
//!   dead letter; after an insert the worker writes the batch's messages one at a time and
//!   moves those still refused there, with the database's error;
//! - everything else (a lost connection, a serialization failure or deadlock, a full disk,
//!   a server shutting down, a missing table or permission an operator can fix) is
//!   retried with the sink's backoff.
//!
//! **Round trips**: four per batch by `COPY` (`BEGIN` with the locked read of the
//! position; `COPY`'s start; the whole `COPY` data in one hand-over; the position with
//! `COMMIT`), three by an insert; each further table of a batch adds those of its rows.
//!
//! **Connections**: a pool (deadpool) of at most `pool_size`; batches are written one at
//! a time in log order (the positions require it), so one connection does the writing and
//! the pool replaces it when it breaks. A connection that failed or timed out is closed,
//! never reused. TLS per `sslmode` in the URL, with rustls checking the server's
//! certificate against `ca_file` or the system's CAs; the password comes from the
//! environment or a file, never from the rules file.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use fleetbus_config::Problems;
use fleetbus_protocol::Message;
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;

use crate::columns::{Cell, Computed};
use crate::config::{SinkPlace, SinkType};
use crate::row::{check_table, Row, TableName, POSITIONS, TABLES_REMEMBERED};
use crate::secret::Secret;
use crate::BatchConfig;
use crate::{Batch, BoxFuture, Sink, SinkError};

/// `type = "postgres"`: rows in a PostgreSQL table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// The server and database: a URL (`postgres://USER@HOST:PORT/DB?sslmode=require`) or
    /// libpq's `key=value` form. Without a password: that is `password`.
    pub url: String,
    /// The password: `{ env = "NAME" }` or `{ file = "/path" }`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// The table the rows go to.
    #[serde(default = "crate::row::default_table")]
    pub table: String,
    /// Create the table (and its unique key) when it is missing. Off, a missing table is
    /// an error the sink retries until an operator creates it.
    #[serde(default = "crate::row::default_create_table")]
    pub create_table: bool,
    /// CA certificates (PEM) that sign the server's certificate, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Most connections the sink holds open.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long connecting, or writing one batch, may take before it is abandoned (the
    /// connection closed) and retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Computed columns (name → CEL expression) instead of the `message` column: a typed
    /// layout ([`crate::columns`]). Each value is cast to its column's type.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

fn default_pool_size() -> usize {
    2
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl PostgresSinkConfig {
    /// The connection settings: the URL with the password added.
    fn connection(&self) -> Result<tokio_postgres::Config, String> {
        connection_config(&self.url, self.password.as_ref(), self.timeout)
    }

    /// The URL without what could be secret, for messages.
    fn place(&self) -> String {
        place_of(&self.url)
    }
}

/// The connection settings of `url` with `password` added and `timeout` to connect; a
/// URL that holds a password itself, or names no host, is refused. Shared by the
/// `postgres` sink and the event console's PostgreSQL store.
pub(crate) fn connection_config(
    url: &str,
    password: Option<&Secret>,
    timeout: Duration,
) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    if config.get_password().is_some() {
        return Err(
            "holds a password: give it as `password = { env = \"NAME\" }` or `{ file = \"/path\" }`, never in the rules file"
                .into(),
        );
    }
    if config.get_hosts().is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    if let Some(secret) = password {
        config.password(secret.resolve()?);
    }
    if config.get_application_name().is_none() {
        config.application_name("fleetbus");
    }
    config
        .connect_timeout(timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(60));
    Ok(config)
}

/// `url` without what could be secret (`host:port/db`), for messages.
pub(crate) fn place_of(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = match c.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => String::new(),
            };
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{host}:{port}/{}",
                c.get_dbname().unwrap_or(c.get_user().unwrap_or(""))
            )
        }
        Err(_) => "(unparsable url)".into(),
    }
}

/// A pool of at most `size` connections made with `connection`, over TLS checked against
/// `ca_file` (or the system's CAs) when the server asks for it; each wait bounded by
/// `timeout`.
pub(crate) fn pool_of(
    connection: tokio_postgres::Config,
    ca_file: Option<&std::path::Path>,
    size: usize,
    timeout: Duration,
) -> Result<Pool, String> {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(crate::tls::client_config(ca_file)?);
    let manager = Manager::from_config(
        connection,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| e.to_string())
}

impl SinkType for PostgresSinkConfig {
    /// 5,000 rows per transaction: each batch costs a few round trips and a commit, and at
    /// 1,000 those kept the sink under 70 % of `COPY`'s rate (docs/benchmarks.md). At most
    /// 8 MiB of log entries, so that large messages do not make a batch of gigabytes.
    fn default_batch(&self) -> BatchConfig {
        BatchConfig {
            max_events: 5_000,
            max_bytes: Some(8 * 1024 * 1024),
            ..BatchConfig::default()
        }
    }

    fn check(&self, p: &mut Problems) {
        if let Err(e) = self.connection() {
            // a missing password secret is reported at its own key
            match &self.password {
                Some(secret) if secret.resolve().is_err() => {
                    p.add("password", e);
                }
                _ => p.add("url", e),
            }
        }
        check_table(&self.table, p);
        p.require(
            (1..=16).contains(&self.pool_size),
            "pool_size",
            "must be between 1 and 16",
        );
        p.require(
            self.timeout >= Duration::from_secs(1) && self.timeout <= Duration::from_secs(300),
            "timeout",
            "must be between 1s and 300s",
        );
        crate::tls::check_ca_file(self.ca_file.as_deref(), p);
        crate::columns::check(&self.columns, p);
    }

    fn file_destination(&self, _: &Message) -> Option<String> {
        Some(format!("postgres {} table {}", self.place(), self.table))
    }

    fn computed_columns(&self) -> Option<&BTreeMap<String, String>> {
        Some(&self.columns)
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        let config_error = |e: String| SinkError::Config(format!("sink `{}`: {e}", place.name));
        let connection = self.connection().map_err(&config_error)?;
        let pool = pool_of(
            connection,
            self.ca_file.as_deref(),
            self.pool_size,
            self.timeout,
        )
        .map_err(&config_error)?;
        Ok(Box::new(PostgresSink {
            inner: Arc::new(Inner {
                name: place.name.to_string(),
                place: self.place(),
                computed: Computed::compile(&self.columns)
                    .map_err(|e| config_error(e.to_string()))?,
                table: TableName::parse(&self.table).map_err(&config_error)?,
                config: self.clone(),
                pool,
                tables_ready: AtomicBool::new(false),
                shapes: Mutex::new(HashMap::new()),
            }),
        }))
    }
}

/// Writes batches into a PostgreSQL table (see the module documentation).
pub struct PostgresSink {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// host:port/database, for messages.
    place: String,
    config: PostgresSinkConfig,
    pool: Pool,
    /// The table, or the template of the tables.
    table: TableName,
    /// The positions table (and a fixed table, with `create_table`) exist.
    tables_ready: AtomicBool,
    /// Each table's [`Shape`], read in the transaction of its first batch: at most
    /// [`TABLES_REMEMBERED`], and forgotten after an error that may mean the tables
    /// changed.
    shapes: Mutex<HashMap<String, Arc<Shape>>>,
    /// The computed columns, if the layout has them.
    computed: Option<Arc<Computed>>,
}

/// What a table's columns allow.
#[derive(Debug)]
struct Shape {
    /// The columns have the default layout's types, so batches can be copied in binary
    /// (else they are inserted, and PostgreSQL casts).
    copy_fits: bool,
    /// The computed columns' types in the table (`format_type`), in their order.
    computed_types: Vec<String>,
}

/// A batch's rows by the table each goes to, the tables in the order they first appear.
#[derive(Debug, Default)]
struct TableRows {
    /// Every row's log index, in the batch's order (a refused row is named by its place).
    index: Vec<u64>,
    /// Each table and its rows.
    tables: Vec<(String, Columns)>,
    /// Where each table is in `tables`.
    at: HashMap<String, usize>,
}

impl TableRows {
    fn push(&mut self, table: String, index: u64, row: Row) {
        self.index.push(index);
        let at = match self.at.get(&table) {
            Some(&at) => at,
            None => {
                self.at.insert(table.clone(), self.tables.len());
                self.tables.push((table, Columns::default()));
                self.tables.len() - 1
            }
        };
        self.tables[at].1.push(index, row);
    }
}

/// A batch's rows as one array per column: the parameters of the `unnest` insert, and
/// what [`Columns::copy_data`] encodes. Public for `fleetbus-bench pg-drivers`, which hands
/// the same rows to both drivers.
#[derive(Debug, Default, Clone)]
pub struct Columns {
    /// The log index of each row (not a column: which rows the database already holds).
    pub index: Vec<u64>,
    /// The `agent` column.
    pub agent: Vec<Option<String>>,
    /// The `stream` column.
    pub stream: Vec<Option<String>>,
    /// The `epoch` column.
    pub epoch: Vec<Option<i64>>,
    /// The `seq` column.
    pub seq: Vec<Option<i64>>,
    /// The `ts` column.
    pub ts: Vec<Option<DateTime<Utc>>>,
    /// The `topic` column.
    pub topic: Vec<String>,
    /// The `received` column.
    pub received: Vec<DateTime<Utc>>,
    /// The `message` column (JSON text).
    pub message: Vec<String>,
    /// Each row's computed cells (none in the default layout).
    pub computed: Vec<Vec<Cell>>,
}

impl Columns {
    /// The rows of `items`; an error (permanent) for an item that cannot be a row.
    pub fn of(items: &[crate::Item]) -> Result<Columns, SinkError> {
        let mut rows = Columns::default();
        for item in items {
            rows.push(item.index, Row::of(item)?);
        }
        Ok(rows)
    }

    /// The rows in PostgreSQL's binary `COPY` format: what one batch sends.
    pub fn copy_data(&self) -> Result<bytes::Bytes, SinkError> {
        binary_copy(self).map_err(|e| SinkError::Encode(e.to_string()))
    }

    fn push(&mut self, index: u64, row: Row) {
        // a `ts` that is not RFC 3339 stays in the message; the column is NULL
        let ts = row
            .ts
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        self.index.push(index);
        self.agent.push(row.agent);
        self.stream.push(row.stream);
        self.epoch.push(row.epoch);
        self.seq.push(row.seq);
        self.ts.push(ts);
        self.topic.push(row.topic);
        self.received.push(row.received);
        self.message.push(row.message);
        self.computed.push(row.computed);
    }

    /// The rows of log entries from `done` on (all of them, but after a crash).
    fn starting_at(&self, done: u64) -> std::borrow::Cow<'_, Columns> {
        let skip = self.index.partition_point(|&i| i < done);
        if skip == 0 {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut rest = self.clone();
        rest.index.drain(..skip);
        rest.agent.drain(..skip);
        rest.stream.drain(..skip);
        rest.epoch.drain(..skip);
        rest.seq.drain(..skip);
        rest.ts.drain(..skip);
        rest.topic.drain(..skip);
        rest.received.drain(..skip);
        rest.message.drain(..skip);
        rest.computed.drain(..skip);
        std::borrow::Cow::Owned(rest)
    }
}

/// How a batch's rows are inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// `COPY ... FROM STDIN BINARY`: the fast path, for a table whose columns have the
    /// default layout's types exactly, when no row is in the table yet.
    Copy,
    /// A plain insert: the fast path for other tables (PostgreSQL casts each value).
    Plain,
    /// With `ON CONFLICT DO NOTHING`: after the plain insert met a row already there.
    SkipExisting,
}

impl Insert {
    /// The `unnest` insert into `table`: the key columns and the message, or with
    /// `computed` (names and the table's types) those columns, each sent as text and cast.
    fn sql(self, table: &str, computed: Option<(&Computed, &[String])>) -> String {
        let conflict = match self {
            Insert::Copy | Insert::Plain => "",
            Insert::SkipExisting => " ON CONFLICT DO NOTHING",
        };
        let keys = "$1::text[], $2::text[], $3::int8[], $4::int8[], $5::timestamptz[], \
                    $6::text[], $7::timestamptz[]";
        let Some((computed, types)) = computed else {
            return format!(
                "INSERT INTO {table} (agent, stream, epoch, seq, ts, topic, received, message) \
                 SELECT * FROM unnest({keys}, $8::text[]::jsonb[]){conflict}"
            );
        };
        let names: Vec<&str> = computed.names().collect();
        let arrays: Vec<String> = (0..names.len())
            .map(|n| format!("${}::text[]", n + 8))
            .collect();
        let aliases: Vec<String> = (0..names.len()).map(|n| format!("x{n}")).collect();
        let casts: Vec<String> = aliases
            .iter()
            .zip(types)
            .map(|(a, ty)| format!("u.{a}::{ty}"))
            .collect();
        format!(
            "INSERT INTO {table} (agent, stream, epoch, seq, ts, topic, received, {}) \
             SELECT u.k1, u.k2, u.k3, u.k4, u.k5, u.k6, u.k7, {} \
             FROM unnest({keys}, {}) AS u(k1, k2, k3, k4, k5, k6, k7, {}){conflict}",
            names.join(", "),
            casts.join(", "),
            arrays.join(", "),
            aliases.join(", ")
        )
    }
}

/// Why [`Inner::insert`] did not insert.
enum InsertError {
    /// A plain insert met a row already in the table.
    Exists,
    /// Any other failure.
    Sink(SinkError),
}

impl From<SinkError> for InsertError {
    fn from(e: SinkError) -> Self {
        InsertError::Sink(e)
    }
}

/// Whether an SQLSTATE says the row itself can never be written: class 22 (data
/// exception: a value out of range, an invalid text, `\u0000` in JSON), 23 (integrity
/// constraint violation) or 54 (program limit exceeded: a value too big).
fn refuses_the_row(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
}

/// The row (0-based) a failed `COPY` stopped at, from the error's context: its line
/// `COPY table, line N, column c` (in the binary format a "line" is a row; other context
/// lines, such as the JSON parser's, have lines of their own).
fn copied_row(e: &tokio_postgres::Error) -> Option<usize> {
    let context = e.as_db_error()?.where_()?;
    let copy = context.lines().find(|l| l.starts_with("COPY "))?;
    let rest = &copy[copy.find(", line ")? + ", line ".len()..];
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse::<usize>().ok()?.checked_sub(1)
}

/// A database error with what PostgreSQL said (severity, SQLSTATE, message, detail,
/// constraint), not only tokio-postgres's "db error".
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(c) = db.constraint() {
                text.push_str(&format!(" [constraint {c}]"));
            }
            if let Some(w) = db.where_() {
                text.push_str(&format!(" [{w}]"));
            }
            text
        }
        None => crate::error_chain(e),
    }
}

/// Most prepared statements a connection keeps (then all are dropped, and closed on the
/// server): a few per table, so a template naming many tables stays bounded.
const STATEMENTS_CACHED: usize = 256;

/// The default layout's columns and their types, as `format_type` names them.
const LAYOUT: [(&str, &str); 8] = [
    ("agent", "text"),
    ("stream", "text"),
    ("epoch", "bigint"),
    ("seq", "bigint"),
    ("ts", "timestamp with time zone"),
    ("topic", "text"),
    ("received", "timestamp with time zone"),
    ("message", "jsonb"),
];

/// The rows by one `unnest` insert (a prepared statement per connection).
async fn insert_rows(
    tx: &deadpool_postgres::Object,
    table: &str,
    c: &Columns,
    how: Insert,
    computed: Option<(&Computed, &[String])>,
) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::types::ToSql;
    let insert = tx.prepare_cached(&how.sql(table, computed)).await?;
    // a computed column's values as text for PostgreSQL to cast: JSON for json columns
    let cells: Vec<Vec<Option<String>>> = match computed {
        Some((_, types)) => types
            .iter()
            .enumerate()
            .map(|(n, ty)| {
                let json = ty == "jsonb" || ty == "json";
                c.computed
                    .iter()
                    .map(|row| {
                        row.get(n).and_then(|cell| match json {
                            true => cell.to_json(),
                            false => cell.to_text(),
                        })
                    })
                    .collect()
            })
            .collect(),
        None => Vec::new(),
    };
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &c.agent,
        &c.stream,
        &c.epoch,
        &c.seq,
        &c.ts,
        &c.topic,
        &c.received,
    ];
    match computed {
        Some(_) => params.extend(cells.iter().map(|v| v as &(dyn ToSql + Sync))),
        None => params.push(&c.message),
    }
    tx.execute(&insert, &params).await.map(|_| ())
}

/// The rows by `COPY ... FROM STDIN BINARY` (the table's columns have the layout's types).
///
/// The whole batch is encoded first and handed to the connection as one message:
/// tokio-postgres's `BinaryCopyInWriter` hands over every 4 KiB, and each hand-over waits
/// for the connection's task to take it, so a batch of 1,000 rows took about a hundred
/// switches between the two tasks while the database waited (measured: docs/benchmarks.md).
async fn copy_rows(
    tx: &deadpool_postgres::Object,
    table: &str,
    data: bytes::Bytes,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = tx
        .copy_in(&format!(
            "COPY {table} (agent, stream, epoch, seq, ts, topic, received, message) \
             FROM STDIN BINARY"
        ))
        .await?;
    tokio::pin!(sink);
    sink.send(data).await?;
    sink.as_mut().finish().await.map(|_| ())
}

/// The rows in PostgreSQL's binary `COPY` format: the header, each row as its field count
/// and each field as a length (-1 for NULL) and its binary value, then the trailer.
fn binary_copy(c: &Columns) -> Result<bytes::Bytes, Box<dyn std::error::Error + Sync + Send>> {
    use bytes::BufMut;
    use tokio_postgres::types::{IsNull, ToSql, Type};
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::JSONB,
    ];
    let size: usize = c.message.iter().map(|m| m.len() + 128).sum();
    let mut buf = bytes::BytesMut::with_capacity(size + 32);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension length
    for n in 0..c.topic.len() {
        let fields: [&(dyn ToSql + Sync); 8] = [
            &c.agent[n],
            &c.stream[n],
            &c.epoch[n],
            &c.seq[n],
            &c.ts[n],
            &c.topic[n],
            &c.received[n],
            &JsonbText(&c.message[n]),
        ];
        buf.put_i16(fields.len() as i16);
        for (value, ty) in fields.iter().zip(&types) {
            let at = buf.len();
            buf.put_i32(0);
            let len = match value.to_sql_checked(ty, &mut buf)? {
                IsNull::Yes => -1,
                IsNull::No => i32::try_from(buf.len() - at - 4)?,
            };
            buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
    buf.put_i16(-1);
    Ok(buf.freeze())
}

/// JSON text sent as `jsonb` in binary form: the format's version (1), then the text.
#[derive(Debug)]
struct JsonbText<'a>(&'a str);

impl tokio_postgres::types::ToSql for JsonbText<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        if *ty == tokio_postgres::types::Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        matches!(
            *ty,
            tokio_postgres::types::Type::JSONB | tokio_postgres::types::Type::JSON
        )
    }

    tokio_postgres::types::to_sql_checked!();
}

impl Inner {
    fn remote(&self, what: &str, e: impl std::fmt::Display) -> SinkError {
        SinkError::Remote(format!("postgres {}: {what}: {e}", self.place))
    }

    /// A connection from the pool (made if need be).
    async fn connection(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.pool.get().await.map_err(|e| {
            let text = match &e {
                deadpool_postgres::PoolError::Backend(e) => describe(e),
                other => other.to_string(),
            };
            self.remote("connect", text)
        })
    }

    /// Creates the positions table and, with `create_table`, a fixed table, once (the
    /// tables of a template are made in the transaction of their first batch).
    async fn ensure_tables(&self, client: &deadpool_postgres::Object) -> Result<(), SinkError> {
        if self.tables_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut sql = format!(
            "CREATE TABLE IF NOT EXISTS {POSITIONS} (sink text NOT NULL, tbl text NOT NULL, \
             next bigint NOT NULL, PRIMARY KEY (sink, tbl));"
        );
        if let (true, TableName::Fixed(table)) = (self.config.create_table, &self.table) {
            sql.push_str(&self.create_table(table));
        }
        // two sinks creating the same table at once: one of them fails; retried
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.remote("create tables", describe(&e)))?;
        self.tables_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The statement that creates `table` in the sink's layout, if it is missing.
    fn create_table(&self, table: &str) -> String {
        // computed columns are made `jsonb` (any value fits); an operator who wants
        // other types makes the table, and each value is cast to its column's type
        let payload = match &self.computed {
            Some(c) => c
                .names()
                .map(|n| format!("{n} jsonb"))
                .collect::<Vec<_>>()
                .join(", "),
            None => "message jsonb NOT NULL".to_string(),
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (agent text, stream text, epoch bigint, \
             seq bigint, ts timestamptz, topic text NOT NULL, \
             received timestamptz NOT NULL, {payload}, \
             UNIQUE (agent, stream, epoch, seq));"
        )
    }

    /// `table`'s [`Shape`]: known, or read in the open transaction (after making the
    /// table, for a template with `create_table`) and added to `fresh`, which the caller
    /// keeps once the transaction commits. A missing table is PostgreSQL's error 42P01.
    async fn shape(
        &self,
        client: &deadpool_postgres::Object,
        table: &str,
        fresh: &mut Vec<(String, Arc<Shape>)>,
    ) -> Result<Arc<Shape>, SinkError> {
        let known = self
            .shapes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
            .cloned();
        if let Some(shape) = known.or_else(|| {
            fresh
                .iter()
                .find(|(t, _)| t == table)
                .map(|(_, s)| s.clone())
        }) {
            return Ok(shape);
        }
        if self.config.create_table && self.table.is_template() {
            client
                .batch_execute(&self.create_table(table))
                .await
                .map_err(|e| self.remote(&format!("create table {table}"), describe(&e)))?;
        }
        let columns = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table],
            )
            .await
            .map_err(|e| self.remote("read the table's columns", describe(&e)))?;
        let types: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
        let fits = LAYOUT
            .iter()
            .all(|(name, ty)| types.iter().any(|(n, t)| n == name && t == ty));
        let mut computed_types = Vec::new();
        if let Some(computed) = &self.computed {
            for name in computed.names() {
                match types.iter().find(|(n, _)| n == name) {
                    Some((_, ty)) => computed_types.push(ty.clone()),
                    None => {
                        return Err(self.remote(
                            "read the table's columns",
                            format!(
                                "table {table} has no column `{name}` (a computed column; add it)"
                            ),
                        ))
                    }
                }
            }
        }
        let shape = Arc::new(Shape {
            copy_fits: fits && self.computed.is_none(),
            computed_types,
        });
        fresh.push((table.to_string(), shape.clone()));
        Ok(shape)
    }

    /// Keeps the shapes read in a committed transaction (forgetting all when there would
    /// be more than [`TABLES_REMEMBERED`]).
    fn remember(&self, fresh: Vec<(String, Arc<Shape>)>) {
        if fresh.is_empty() {
            return;
        }
        let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        if shapes.len() + fresh.len() > TABLES_REMEMBERED {
            shapes.clear();
        }
        shapes.extend(fresh);
    }

    /// Inserts the rows and the position `next` in one transaction. Rows of log entries
    /// the database already holds (before its stored position) are skipped. A plain insert
    /// that meets a row already in a table (SQLSTATE 23505: a record stored twice in the
    /// log, or a row the operator put there) fails as [`InsertError::Exists`], and the
    /// caller inserts again with `skip_existing`. A failed transaction is rolled back
    /// before the connection is used again.
    async fn insert(
        &self,
        client: &mut deadpool_postgres::Object,
        rows: &TableRows,
        next: u64,
        skip_existing: bool,
    ) -> Result<(), InsertError> {
        self.ensure_tables(client).await?;
        // one prepared insert per table and way: a template naming endless tables must
        // not hold endless statements (dropping them closes them on the server)
        if client.statement_cache.size() > STATEMENTS_CACHED {
            client.statement_cache.clear();
        }
        let result = self
            .insert_in_transaction(client, rows, next, skip_existing)
            .await;
        match result {
            Ok(fresh) => {
                self.remember(fresh);
                Ok(())
            }
            Err(failed) => {
                // outside a transaction this only warns; a connection that cannot even
                // roll back is broken: the batch is retried (a retryable error has `write`
                // drop the connection), saying what failed first
                if let Err(e) = client.batch_execute("ROLLBACK").await {
                    let first = match &failed {
                        InsertError::Exists => "a row already in the table".to_string(),
                        InsertError::Sink(e) => e.to_string(),
                    };
                    return Err(self
                        .remote("roll back", format!("{} (after: {first})", describe(&e)))
                        .into());
                }
                Err(failed)
            }
        }
    }

    /// The transaction of [`Inner::insert`]: `BEGIN` with the locked read of the stored
    /// position, then per table its rows (by `COPY`, its start then its data, or by an
    /// insert; the first batch of a table also reads its columns, after making it for a
    /// template), and the new position with `COMMIT`. With one table that is four round
    /// trips by `COPY`, three by an insert (statements sent together: tokio-postgres
    /// pipelines requests polled at once; both position statements are prepared once per
    /// connection). Returns the shapes of the tables read for the first time.
    async fn insert_in_transaction(
        &self,
        client: &deadpool_postgres::Object,
        rows: &TableRows,
        next: u64,
        skip_existing: bool,
    ) -> Result<Vec<(String, Arc<Shape>)>, InsertError> {
        // the position is kept under the table as configured (a template's text)
        let position_table = &self.config.table;
        let next = i64::try_from(next).map_err(|e| self.remote("position", e))?;
        let read = format!("SELECT next FROM {POSITIONS} WHERE sink = $1 AND tbl = $2 FOR UPDATE");
        let save = format!(
            "INSERT INTO {POSITIONS} (sink, tbl, next) VALUES ($1, $2, $3) \
             ON CONFLICT (sink, tbl) DO UPDATE SET next = GREATEST({POSITIONS}.next, excluded.next)"
        );
        let (read, save) =
            tokio::try_join!(client.prepare_cached(&read), client.prepare_cached(&save))
                .map_err(|e| self.remote("prepare", describe(&e)))?;
        let key: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.name, position_table];
        let (begun, done) =
            tokio::join!(client.batch_execute("BEGIN"), client.query_opt(&read, &key),);
        begun.map_err(|e| self.remote("begin", describe(&e)))?;
        let done: i64 = done
            .map_err(|e| self.remote("read the position", describe(&e)))?
            .map_or(0, |r| r.get(0));
        let mut fresh = Vec::new();
        for (table, table_rows) in &rows.tables {
            let columns = table_rows.starting_at(done.max(0) as u64);
            if columns.topic.is_empty() {
                continue;
            }
            let shape = self.shape(client, table, &mut fresh).await?;
            let how = match (skip_existing, shape.copy_fits) {
                (true, _) => Insert::SkipExisting,
                (false, true) => Insert::Copy,
                (false, false) => Insert::Plain,
            };
            let inserted = match how {
                Insert::Copy => {
                    let data = binary_copy(&columns)
                        .map_err(|e| SinkError::Encode(format!("postgres {}: {e}", self.place)))?;
                    copy_rows(client, table, data).await
                }
                Insert::Plain | Insert::SkipExisting => {
                    let computed = self
                        .computed
                        .as_deref()
                        .map(|c| (c, shape.computed_types.as_slice()));
                    insert_rows(client, table, &columns, how, computed).await
                }
            };
            if let Err(e) = inserted {
                if how != Insert::SkipExisting && e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    return Err(InsertError::Exists);
                }
                let text = format!(
                    "postgres {}: insert into {table}: {}",
                    self.place,
                    describe(&e)
                );
                let refused = match e.code() {
                    Some(code) if refuses_the_row(code) => SinkError::Refused(text),
                    _ => return Err(SinkError::Remote(text).into()),
                };
                // COPY names the row it stopped at: only that one goes to the dead letter
                // (else the worker tries each row of the batch alone to find it)
                let at = copied_row(&e)
                    .and_then(|n| columns.index.get(n))
                    .and_then(|i| rows.index.iter().position(|j| j == i));
                return Err(match (how, at) {
                    (Insert::Copy, Some(at)) => SinkError::Rejected {
                        items: vec![at],
                        error: Box::new(refused),
                    },
                    _ => refused,
                }
                .into());
            }
        }
        // a failed position update turns the COMMIT into a rollback: nothing is kept
        let position: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&self.name, position_table, &next];
        let (saved, committed) = tokio::join!(
            client.execute(&save, &position),
            client.batch_execute("COMMIT"),
        );
        saved.map_err(|e| self.remote("save the position", describe(&e)))?;
        committed.map_err(|e| self.remote("commit", describe(&e)))?;
        Ok(fresh)
    }

    /// The plain insert, and when a row was already there, the insert that skips it.
    async fn insert_batch(
        &self,
        client: &mut deadpool_postgres::Object,
        rows: &TableRows,
        next: u64,
    ) -> Result<(), SinkError> {
        match self.insert(client, rows, next, false).await {
            Err(InsertError::Exists) => match self.insert(client, rows, next, true).await {
                Err(InsertError::Exists) => Err(self.remote("insert", "row exists")),
                Err(InsertError::Sink(e)) => Err(e),
                Ok(()) => Ok(()),
            },
            Err(InsertError::Sink(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// Writes a batch within the timeout. A connection that failed or timed out is
    /// closed (taken out of the pool), never reused.
    async fn write(&self, rows: TableRows, next: u64) -> Result<(), SinkError> {
        let timeout = self.config.timeout;
        let mut client = tokio::time::timeout(timeout, self.connection())
            .await
            .map_err(|_| self.remote("connect", format!("no connection within {timeout:?}")))??;
        let result =
            tokio::time::timeout(timeout, self.insert_batch(&mut client, &rows, next)).await;
        let result = result.unwrap_or_else(|_| {
            Err(self.remote(
                "write",
                format!("the batch was not committed within {timeout:?}"),
            ))
        });
        if matches!(&result, Err(e) if e.class() == crate::ErrorClass::Retryable) {
            // unknown state (a broken connection, a statement still running): drop it
            drop(deadpool_postgres::Object::take(client));
            self.tables_ready.store(false, Ordering::Relaxed);
            self.shapes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        result
    }

    /// The start-up check: connects and makes the tables, and says in the log whether
    /// the database is reachable. Never fails the start; the writes retry.
    async fn probe(&self) {
        let checked = tokio::time::timeout(self.config.timeout, async {
            let client = self.connection().await?;
            self.ensure_tables(&client).await
        })
        .await
        .unwrap_or_else(|_| Err(self.remote("connect", "timed out")));
        match checked {
            Ok(()) => tracing::info!(
                sink = %self.name,
                database = %self.place,
                table = %self.config.table,
                "postgres sink: connected"
            ),
            Err(e) => tracing::warn!(
                sink = %self.name,
                error = %e,
                "postgres sink: database not reachable at start; its messages wait in the log and every write retries"
            ),
        }
    }
}

impl Sink for PostgresSink {
    fn writes_json(&self) -> bool {
        // computed columns replace the message's JSON
        self.inner.computed.is_none()
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut rows = TableRows::default();
            let mut unencodable = Vec::new();
            let mut first_error = None;
            let table = &self.inner.table;
            for (n, item) in batch.items.iter().enumerate() {
                let row = Row::with(item, self.inner.computed.as_deref())
                    .and_then(|row| Ok((table.of(item.message()?), row)));
                match row {
                    Ok((table, row)) => rows.push(table, item.index, row),
                    Err(e) => {
                        unencodable.push(n);
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(error) = first_error {
                return Err(SinkError::Rejected {
                    items: unencodable,
                    error: Box::new(error),
                });
            }
            self.inner.write(rows, batch.next).await
        })
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        // resuming from the saved position is right even when the database holds more:
        // each write skips what it already has. So the start waits for nothing; the
        // reachability check runs beside it
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.probe().await });
        Box::pin(async move { Ok(saved) })
    }

    fn exactly_once(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
