//! Sink configuration: the `[sinks.NAME]` tables of a rules file.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::file::{FileSink, FileSinkConfig};
use crate::stdout::{StdoutSink, StdoutSinkConfig};
use crate::{Sink, SinkError, SinkErrorKind};

/// One sink's configuration, selected by its `type` key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// `type = "file"`: JSON lines into templated paths under the server's data directory.
    File(FileSinkConfig),
    /// `type = "stdout"`: JSON lines on standard output.
    Stdout(StdoutSinkConfig),
}

/// `buffer`: the in-memory queue in front of a sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Most messages queued for the sink; when full, new messages for this sink are
    /// dropped, counted and logged (other sinks are unaffected).
    pub max_events: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_events: 100_000,
        }
    }
}

/// `batch`: how messages are grouped into writes, and how failed writes are retried.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most messages in one write.
    pub max_events: usize,
    /// Longest time written data may sit in the sink's buffers before a flush.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Attempts per batch before it is given up (logged and counted).
    pub max_attempts: u32,
    /// First delay between attempts (doubles each time, with jitter, up to 30 s).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 1_000,
            flush_interval: Duration::from_millis(500),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

impl SinkConfig {
    /// The sink's type name as written in the file.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Stdout(_) => "stdout",
        }
    }

    /// Its queue settings.
    pub fn buffer(&self) -> &BufferConfig {
        match self {
            SinkConfig::File(c) => &c.buffer,
            SinkConfig::Stdout(c) => &c.buffer,
        }
    }

    /// Its batch settings.
    pub fn batch(&self) -> &BatchConfig {
        match self {
            SinkConfig::File(c) => &c.batch,
            SinkConfig::Stdout(c) => &c.batch,
        }
    }

    /// Checks everything that can be checked without touching the outside world.
    pub fn validate(&self) -> Result<(), String> {
        if self.buffer().max_events == 0 {
            return Err("buffer.max_events must be at least 1".into());
        }
        if self.batch().max_events == 0 {
            return Err("batch.max_events must be at least 1".into());
        }
        if self.batch().max_attempts == 0 {
            return Err("batch.max_attempts must be at least 1".into());
        }
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Stdout(_) => Ok(()),
        }
    }

    /// Builds the sink. Relative file paths are resolved under `data_dir`.
    pub fn build(&self, data_dir: &Path) -> Result<Box<dyn Sink>, SinkError> {
        self.validate()
            .map_err(|e| SinkError::after(0, SinkErrorKind::Config(e)))?;
        Ok(match self {
            SinkConfig::File(c) => Box::new(FileSink::new(c, data_dir)?),
            SinkConfig::Stdout(_) => Box::new(StdoutSink),
        })
    }
}
