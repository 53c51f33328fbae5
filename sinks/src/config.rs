//! Sink configuration: the `[sinks.NAME]` tables of a rules file.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::file::{FileSink, FileSinkConfig};
use crate::s3::{S3Sink, S3SinkConfig};
use crate::stdout::{StdoutSink, StdoutSinkConfig};
use crate::{Sink, SinkError};

/// One sink's configuration, selected by its `type` key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// `type = "file"`: JSON lines into templated paths under the server's data directory.
    File(FileSinkConfig),
    /// `type = "stdout"`: JSON lines on standard output.
    Stdout(StdoutSinkConfig),
    /// `type = "s3"`: files and record batches into an S3 bucket.
    S3(S3SinkConfig),
}

/// `buffer`: how much of the write-ahead log may wait for this sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Bytes of log entries waiting for this sink at most. Beyond it the server stops
    /// accepting (and acknowledging) records that go to this sink: agents keep them in
    /// their outboxes and send them again later. Nothing is dropped.
    pub max_bytes: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `batch`: how entries are grouped into writes, and how failed writes are retried.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most messages in one write.
    pub max_events: usize,
    /// Most bytes (of log entries) in one write (unset: no limit besides `max_events`).
    pub max_bytes: Option<u64>,
    /// How long a write may wait for more messages to fill it (its oldest message's age);
    /// 0 = write whatever is there at once.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Attempts per batch before it goes to the `dead_letter` sink (0 = no limit). Without
    /// a `dead_letter` sink a batch is retried until it is written: never dropped.
    pub max_attempts: u32,
    /// Time after the first failure at which a batch goes to the `dead_letter` sink
    /// (unset = no limit).
    #[serde(with = "humantime_serde")]
    pub max_retry_age: Option<Duration>,
    /// First delay between attempts (doubling, with jitter, up to `retry_backoff_max`).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 1_000,
            max_bytes: None,
            max_age: Duration::ZERO,
            max_attempts: 0,
            max_retry_age: None,
            retry_backoff: Duration::from_millis(200),
            retry_backoff_max: Duration::from_secs(5),
        }
    }
}

impl SinkConfig {
    /// Where this sink puts a completed file, in words an operator can follow: `file
    /// PATH` (relative to the server's `data_dir`), `s3://BUCKET/KEY`, `stdout`. None when
    /// the template does not parse (the rules file check reports that).
    pub fn file_destination(&self, msg: &fleetbus_protocol::Message) -> Option<String> {
        match self {
            SinkConfig::File(c) => {
                let path = crate::template::PathTemplate::parse(&c.path).ok()?;
                Some(format!("file {}", path.render(msg)))
            }
            SinkConfig::S3(c) => {
                let key = crate::template::PathTemplate::parse(&c.key).ok()?;
                Some(format!("s3://{}/{}", c.bucket, key.render(msg)))
            }
            SinkConfig::Stdout(_) => Some("stdout".into()),
        }
    }

    /// The sink's type name as written in the file.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::S3(_) => "s3",
        }
    }

    /// Its backpressure settings.
    pub fn buffer(&self) -> &BufferConfig {
        match self {
            SinkConfig::File(c) => &c.buffer,
            SinkConfig::Stdout(c) => &c.buffer,
            SinkConfig::S3(c) => &c.buffer,
        }
    }

    /// Its batch settings.
    pub fn batch(&self) -> &BatchConfig {
        match self {
            SinkConfig::File(c) => &c.batch,
            SinkConfig::Stdout(c) => &c.batch,
            SinkConfig::S3(c) => &c.batch,
        }
    }

    /// The sink its given-up batches go to.
    pub fn dead_letter(&self) -> Option<&str> {
        match self {
            SinkConfig::File(c) => c.dead_letter.as_deref(),
            SinkConfig::Stdout(c) => c.dead_letter.as_deref(),
            SinkConfig::S3(c) => c.dead_letter.as_deref(),
        }
    }

    /// Checks everything that can be checked without touching the outside world.
    pub fn validate(&self) -> Result<(), String> {
        if self.buffer().max_bytes < 1024 * 1024 {
            return Err("buffer.max_bytes must be at least 1 MiB".into());
        }
        if self.batch().max_events == 0 {
            return Err("batch.max_events must be at least 1".into());
        }
        if self.batch().max_bytes == Some(0) {
            return Err("batch.max_bytes must be at least 1 (leave it unset for no limit)".into());
        }
        if self.batch().max_age > Duration::from_secs(3600) {
            return Err("batch.max_age must be at most 1h".into());
        }
        if self.dead_letter().is_none()
            && (self.batch().max_attempts > 0 || self.batch().max_retry_age.is_some())
        {
            return Err("batch.max_attempts / batch.max_retry_age need a `dead_letter` sink to give batches to (without one, batches are retried until written)".into());
        }
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Stdout(_) => Ok(()),
            SinkConfig::S3(c) => c.validate(),
        }
    }

    /// Builds sink `name`. File paths resolve under `data_dir`; the sink keeps its own
    /// state (batch markers) in `state_dir`.
    pub fn build(
        &self,
        name: &str,
        data_dir: &Path,
        state_dir: &Path,
    ) -> Result<Box<dyn Sink>, SinkError> {
        self.validate().map_err(SinkError::Config)?;
        Ok(match self {
            SinkConfig::File(c) => Box::new(FileSink::new(name, c, data_dir, state_dir)?),
            SinkConfig::Stdout(_) => Box::new(StdoutSink),
            SinkConfig::S3(c) => Box::new(S3Sink::new(c, data_dir)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completed_file_destination_is_named_per_sink_type() {
        let sinks: std::collections::BTreeMap<String, SinkConfig> = toml::from_str(
            "[file]\ntype = \"file\"\npath = \"received/{agent}/{file.name}\"\n\
             [s3]\ntype = \"s3\"\nbucket = \"samples\"\nkey = \"{agent}/{file.sha256}\"\n\
             [out]\ntype = \"stdout\"\n",
        )
        .unwrap();
        let msg = fleetbus_protocol::Message::decode(
            "fleet/web-1/files/f1/complete",
            br#"{"agent":"web-1","kind":"file","file":{"file_id":"f1","name":"core.dump","size":3,"sha256":"abc","chunk_size":1024,"chunk_count":1},"spool":"web-1/f1/data","ts":"2026-12-01T00:00:00Z"}"#,
        )
        .unwrap();
        let place = |name: &str| sinks[name].file_destination(&msg).unwrap();
        assert_eq!(place("file"), "file received/web-1/core.dump");
        assert_eq!(place("s3"), "s3://samples/web-1/abc");
        assert_eq!(place("out"), "stdout");
    }
}
