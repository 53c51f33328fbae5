//! Storage sinks behind one [`Sink`] trait, and the worker that feeds each sink from its
//! own bounded queue so that a slow or failing sink never holds up the others.
//!
//! | type | what it writes |
//! |---|---|
//! | `file` | JSON lines into files named by a path template (`{agent}`, `{stream}`, `{topic.N}`, strftime) |
//! | `stdout` | JSON lines on standard output |

pub mod config;
pub mod file;
pub mod inventory;
pub mod stdout;
pub mod template;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub use config::{BatchConfig, BufferConfig, SinkConfig};
use fleetbus_protocol::Message;
pub use template::{PathTemplate, TemplateError};
pub use worker::{spawn_sink, SinkHandle, SinkStats, SinkStatsSnapshot};

/// A boxed future, as returned by [`Sink`] methods (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A destination for messages. Implementations write a whole batch or report how much of
/// it they wrote before failing, so that a retry continues where the failure happened.
pub trait Sink: Send {
    /// Writes `batch` in order.
    fn write<'a>(&'a mut self, batch: &'a [Arc<Message>]) -> BoxFuture<'a, Result<(), SinkError>>;
    /// Makes everything written so far durable/visible (flush buffers, close idle files).
    fn flush(&mut self) -> BoxFuture<'_, Result<(), SinkError>>;
}

/// A failed write.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct SinkError {
    /// How many messages at the start of the batch were written before the failure.
    pub written: usize,
    /// What failed.
    pub kind: SinkErrorKind,
}

/// What a sink failure was.
#[derive(Debug, thiserror::Error)]
pub enum SinkErrorKind {
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
}

impl SinkError {
    /// A failure after `written` messages of the batch.
    pub fn after(written: usize, kind: SinkErrorKind) -> Self {
        SinkError { written, kind }
    }
}
