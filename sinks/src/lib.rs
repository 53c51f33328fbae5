//! Storage sinks behind one [`Sink`] trait: the destinations and their configuration. The
//! worker that feeds each sink from the server's write-ahead log is the pipeline's
//! (`fleetbus-pipeline`).
//!
//! | type | what it writes | delivery |
//! |---|---|---|
//! | `file` | JSON lines into files named by a path template (`{agent}`, `{stream}`, `{topic.N}`, strftime) | exactly once (batches are made idempotent) |
//! | `stdout` | JSON lines on standard output | at least once |
//! | `sqlite` | one row per message (key columns, the message as JSON or computed columns) in an SQLite table | exactly once (a unique record key, and the log position committed with each batch) |
//! | `postgres` | one row per message (key columns, the message as `jsonb` or computed columns) in a PostgreSQL table, a binary `COPY` per batch | exactly once (as `sqlite`) |
//! | `mqtt` | each message republished on a templated topic, into the server's own broker or another one | at least once |
//! | `http` | one request per batch (JSON array or NDJSON) with an `Idempotency-Key` | at least once (exactly once with a receiver that honours the key) |
//! | `influxdb` | one point per metric of a record, in line protocol, one request per batch (InfluxDB 1.x `/write` or 2.x `/api/v2/write`) | exactly once (a point written again replaces itself) |
//! | `s3` | files streamed from the spool (multipart); records batched into JSON-lines objects with deterministic keys | exactly once per key (a retry overwrites) |

pub mod columns;
pub mod completion;
pub mod config;
pub mod console;
pub mod file;
pub mod http;
pub mod influxdb;
pub mod item;
pub mod mqtt;
pub mod postgres;
pub mod row;
pub mod s3;
pub mod secret;
pub mod sqlite;
pub mod stdout;
pub mod template;
pub mod tls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub use config::{BatchConfig, BatchKeys, BufferConfig, SinkConfig, SinkKind, SinkPlace, SinkType};
pub use item::{decode_entry, record_key, Item};
pub use template::{PathTemplate, TemplateError};

/// A boxed future, as returned by [`Sink`] methods (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The messages of WAL entries `first..next` that go to one sink, in WAL order.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// WAL index of the first entry the batch covers.
    pub first: u64,
    /// WAL index after the last entry the batch covers (where reading resumes).
    pub next: u64,
    /// The messages.
    pub items: Vec<Item>,
}

/// A destination for messages.
///
/// The worker calls [`Sink::recover`] once, then [`Sink::write`] for each batch, retrying a
/// failed batch as it is. A sink that can make a batch idempotent (written again after a
/// failure or a crash, it does not duplicate) gives exactly-once delivery; others give
/// at-least-once.
pub trait Sink: Send {
    /// Writes `batch` durably.
    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>>;

    /// Called once at start with the saved resume position. Undoes a batch that a crash
    /// interrupted, and returns where reading must resume: `saved`, or the end of a batch
    /// the sink knows it completed after `saved` was written.
    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        Box::pin(async move { Ok(saved) })
    }

    /// True when [`Sink::write`] is idempotent per batch (exactly-once delivery).
    fn exactly_once(&self) -> bool {
        false
    }

    /// True when the sink writes each message's body as JSON ([`json_line`]): the worker
    /// then renders it ahead ([`Item::json`]), off the task that waits for the write.
    fn writes_json(&self) -> bool {
        false
    }

    /// True when the sink reads the decoded message ([`Item::message`]) of most items.
    /// A sink that writes only each body's JSON and the log entry's fields says false:
    /// the worker then never decodes its messages (the JSON is rendered straight from the
    /// payload), and [`Item::message`] decodes one only when asked.
    fn needs_message(&self) -> bool {
        true
    }
}

/// A failed write.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file or device could not be written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A message could not be encoded for this sink.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The sink's configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// A remote service (S3, HTTP...) refused or failed the request.
    #[error("{0}")]
    Remote(String),
    /// The destination refused these messages for good (a row that breaks the table's
    /// constraints or types, an HTTP 4xx): writing them again cannot help.
    #[error("{0}")]
    Refused(String),
    /// The destination asks to be left alone for `wait` (HTTP 429 or 503 with
    /// `Retry-After`): retried, not sooner.
    #[error("{reason}")]
    RetryAfter {
        /// How long to wait at least.
        wait: std::time::Duration,
        /// What the destination said.
        reason: String,
    },
    /// The task doing the sink's blocking I/O failed (panicked or was cancelled).
    #[error("sink I/O task failed: {0}")]
    Task(String),
    /// Some messages of the batch can never be written (their positions in
    /// [`Batch::items`]); the others can. The worker moves those to the dead-letter sink at
    /// once and writes the rest.
    #[error("{error}")]
    Rejected {
        /// Positions in the batch of the messages that cannot be written.
        items: Vec<usize>,
        /// Why (a permanent error).
        error: Box<SinkError>,
    },
}

/// Whether retrying a failed write can ever help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The destination may come back (network, 5xx, a full or read-only disk, a missing
    /// directory an operator can create): retry with backoff.
    Retryable,
    /// These messages can never be written (a path too long for the filesystem, a payload
    /// that cannot be encoded, a completed file that is gone): retrying would stall the
    /// sink for ever. They go to the dead-letter sink at once.
    Permanent,
}

/// OS errors that say the write itself is impossible, not that the destination is down:
/// ENAMETOOLONG, EILSEQ (a name the filesystem cannot represent), EFBIG, EINVAL.
fn permanent_os_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(36 | 84 | 27 | 22))
}

impl SinkError {
    /// Whether retrying can help (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Io { source, op, .. } => {
                let gone =
                    *op == COMPLETED_FILE_OP && source.kind() == std::io::ErrorKind::NotFound;
                match gone || permanent_os_error(source) {
                    true => ErrorClass::Permanent,
                    false => ErrorClass::Retryable,
                }
            }
            SinkError::Encode(_) | SinkError::Refused(_) | SinkError::Rejected { .. } => {
                ErrorClass::Permanent
            }
            SinkError::Config(_)
            | SinkError::Remote(_)
            | SinkError::RetryAfter { .. }
            | SinkError::Task(_) => ErrorClass::Retryable,
        }
    }

    /// The positions of the messages that cannot be written, when the sink said which.
    pub fn rejected_items(&self) -> Option<&[usize]> {
        match self {
            SinkError::Rejected { items, .. } => Some(items),
            _ => None,
        }
    }

    /// `self` for the messages at `items`, when it is permanent; `self` unchanged when it is
    /// retryable (the whole batch is retried).
    pub fn for_items(self, items: Vec<usize>) -> SinkError {
        match self.class() {
            ErrorClass::Permanent if !matches!(self, SinkError::Rejected { .. }) => {
                SinkError::Rejected {
                    items,
                    error: Box::new(self),
                }
            }
            _ => self,
        }
    }
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        SinkError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// The `op` of an I/O error opening a completed file's spool copy: when the file is gone,
/// no retry brings it back.
pub const COMPLETED_FILE_OP: &str = "open completed file";

/// Name of the dead-letter sink every server has: where messages that can never be written
/// go when their sink names no `dead_letter`, and where ingest puts messages whose names
/// cannot be used (JSON lines in `data_dir/dead-letters/`).
pub const BUILTIN_DEAD_LETTERS: &str = "fleetbus.dead-letters";

/// The configuration of [`BUILTIN_DEAD_LETTERS`]: one file a day, no part of the path taken
/// from a message (so it cannot fail for a message's sake).
pub fn builtin_dead_letters() -> SinkConfig {
    SinkConfig::new(SinkKind::File(file::FileSinkConfig {
        path: "dead-letters/%Y-%m-%d.jsonl".into(),
        completed_files: file::CompletedFiles::default(),
    }))
}

/// The JSON line a sink writes for `item`: the message body
/// ([`fleetbus_protocol::write_json_body`]), or for a dead letter an envelope
/// `{"dead_letter": {...}, "record": body, "topic": ...}`. On an error `out` is left as it
/// was.
pub fn json_line(item: &Item, out: &mut Vec<u8>) -> Result<(), SinkError> {
    let start = out.len();
    let result = match (item.dead_letter(), &item.json) {
        (None, Some(json)) => {
            out.extend_from_slice(json);
            Ok(())
        }
        (None, None) => item.write_json_body(out),
        (Some(dl), _) => dead_letter_envelope(item, dl, out),
    };
    match result {
        Ok(()) => {
            out.push(b'\n');
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// The JSON of a dead letter: why (`dead_letter`), the body (`record`) and its `topic`.
fn dead_letter_envelope(
    item: &Item,
    dl: &fleetbus_wal::DeadLetter,
    out: &mut Vec<u8>,
) -> Result<(), SinkError> {
    let encode = |e: serde_json::Error| SinkError::Encode(e.to_string());
    out.extend_from_slice(b"{\"dead_letter\":");
    serde_json::to_writer(&mut *out, dl).map_err(encode)?;
    out.extend_from_slice(b",\"record\":");
    item.write_json_body(out)?;
    out.extend_from_slice(b",\"topic\":");
    serde_json::to_writer(&mut *out, &item.entry.topic).map_err(encode)?;
    out.push(b'}');
    Ok(())
}

pub use fleetbus_support::error_chain;

/// Replaces `path` with `bytes` durably (creating its directory if need be): never half
/// written, and the new content survives a power loss ([`fleetbus_support::durable`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SinkError::io(dir, "create directory", e))?;
    }
    fleetbus_support::replace_file(path, bytes).map_err(|e| SinkError::io(path, "save", e))
}
