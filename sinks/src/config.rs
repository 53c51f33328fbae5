//! Sink configuration: the `[sinks.NAME]` tables of a rules file.

use std::path::Path;
use std::time::Duration;

use fleetbus_config::{Check, Problems};
use fleetbus_protocol::Message;
use serde::{Deserialize, Serialize};

use crate::console::ConsoleSinkConfig;
use crate::file::FileSinkConfig;
use crate::http::HttpSinkConfig;
use crate::influxdb::InfluxSinkConfig;
use crate::mqtt::MqttSinkConfig;
use crate::postgres::PostgresSinkConfig;
use crate::s3::S3SinkConfig;
use crate::sqlite::SqliteSinkConfig;
use crate::stdout::StdoutSinkConfig;
use crate::{Sink, SinkError};

/// One `[sinks.NAME]` table: the keys every sink has (`dead_letter`, `buffer`, `batch`),
/// and beside them the keys of its `type`. A misspelt key of either kind is an error.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkConfig {
    /// The sink its given-up batches go to (see `batch.max_attempts`).
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Backpressure settings.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// The batch keys the table sets; the others come from the type's defaults
    /// ([`SinkType::default_batch`]). See [`SinkConfig::batch`].
    #[serde(default)]
    pub batch: BatchKeys,
    /// The type and its own keys.
    #[serde(flatten)]
    pub kind: SinkKind,
}

/// What a sink type provides beyond its keys: its checks, its batch defaults, where it puts
/// a completed file, and how it is built. A new sink type is a module with a config struct
/// implementing this, and one line in [`sink_types!`](SinkKind).
pub trait SinkType {
    /// The batch settings for the keys a table leaves unset.
    fn default_batch(&self) -> BatchConfig {
        BatchConfig::default()
    }

    /// Records every problem with the type's own keys (relative to the sink's table).
    fn check(&self, problems: &mut Problems);

    /// Where this sink puts a completed file, in words an operator can follow (`file
    /// PATH`, `s3://BUCKET/KEY`); None when a template does not parse.
    fn file_destination(&self, msg: &Message) -> Option<String>;

    /// Builds the sink (its configuration already checked).
    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError>;

    /// Its computed columns (name → CEL expression), for a type that has them
    /// ([`crate::columns`]): `rules check` checks their variables as it does `where`'s.
    fn computed_columns(&self) -> Option<&std::collections::BTreeMap<String, String>> {
        None
    }
}

/// Where a sink being built lives.
#[derive(Debug, Clone, Copy)]
pub struct SinkPlace<'a> {
    /// The sink's name (`[sinks.NAME]`).
    pub name: &'a str,
    /// The server's data directory: relative paths resolve here.
    pub data_dir: &'a Path,
    /// The sink's own state directory (e.g. batch markers).
    pub state_dir: &'a Path,
    /// The broker the server (or `fleetbus rules run`) is attached to: where an `mqtt`
    /// sink without `url` republishes.
    pub broker: &'a fleetbus_support::Publisher,
}

impl<'a> SinkPlace<'a> {
    /// Sink `name` with its data and its state in `dir`, and no broker (an `mqtt` sink
    /// without `url` has nowhere to publish): a sink used on its own, as the tests and the
    /// benchmarks use one.
    pub fn in_dir(name: &'a str, dir: &'a Path) -> SinkPlace<'a> {
        SinkPlace {
            name,
            data_dir: dir,
            state_dir: dir,
            broker: &NO_BROKER,
        }
    }
}

/// The broker of [`SinkPlace::in_dir`]: publishes nothing.
static NO_BROKER: std::sync::LazyLock<fleetbus_support::Publisher> =
    std::sync::LazyLock::new(fleetbus_support::Publisher::discard);

/// Declares [`SinkKind`]: one line per sink type, `"type name" => Variant(ConfigType)`.
macro_rules! sink_types {
    ($($(#[doc = $doc:literal])* $name:literal => $variant:ident($config:ty),)*) => {
        /// A sink's type, selected by its `type` key, with that type's own keys.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "type")]
        pub enum SinkKind {
            $($(#[doc = $doc])* #[serde(rename = $name)] $variant($config),)*
        }

        impl SinkKind {
            /// The type's behaviour.
            pub fn sink_type(&self) -> &dyn SinkType {
                match self {
                    $(SinkKind::$variant(c) => c,)*
                }
            }

            /// The type's name as written in the file.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(SinkKind::$variant(_) => $name,)*
                }
            }
        }
    };
}

sink_types! {
    /// `type = "file"`: JSON lines into templated paths under the server's data directory.
    "file" => File(FileSinkConfig),
    /// `type = "stdout"`: JSON lines on standard output.
    "stdout" => Stdout(StdoutSinkConfig),
    /// `type = "s3"`: files and record batches into an S3 bucket.
    "s3" => S3(S3SinkConfig),
    /// `type = "http"`: one request per batch to a webhook.
    "http" => Http(HttpSinkConfig),
    /// `type = "sqlite"`: one row per message in an SQLite table.
    "sqlite" => Sqlite(SqliteSinkConfig),
    /// `type = "postgres"`: one row per message in a PostgreSQL table.
    "postgres" => Postgres(PostgresSinkConfig),
    /// `type = "mqtt"`: republish on a templated topic, into the server's broker or another.
    "mqtt" => Mqtt(MqttSinkConfig),
    /// `type = "influxdb"`: one point per metric, InfluxDB line protocol.
    "influxdb" => Influxdb(InfluxSinkConfig),
    /// `type = "console"`: event records folded into the event console.
    "console" => Console(ConsoleSinkConfig),
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

/// The `batch` keys a sink's table sets: each one replaces the type's default for it
/// (an S3 sink that sets only `max_attempts` keeps its 10,000 events per object).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchKeys {
    /// See [`BatchConfig::max_events`].
    pub max_events: Option<usize>,
    /// See [`BatchConfig::max_bytes`].
    pub max_bytes: Option<u64>,
    /// See [`BatchConfig::max_age`].
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// See [`BatchConfig::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`BatchConfig::max_retry_age`].
    #[serde(with = "humantime_serde")]
    pub max_retry_age: Option<Duration>,
    /// See [`BatchConfig::retry_backoff`].
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Option<Duration>,
    /// See [`BatchConfig::retry_backoff_max`].
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Option<Duration>,
}

impl BatchKeys {
    /// `defaults` with the keys set here replacing theirs.
    pub fn over(&self, defaults: BatchConfig) -> BatchConfig {
        BatchConfig {
            max_events: self.max_events.unwrap_or(defaults.max_events),
            max_bytes: self.max_bytes.or(defaults.max_bytes),
            max_age: self.max_age.unwrap_or(defaults.max_age),
            max_attempts: self.max_attempts.unwrap_or(defaults.max_attempts),
            max_retry_age: self.max_retry_age.or(defaults.max_retry_age),
            retry_backoff: self.retry_backoff.unwrap_or(defaults.retry_backoff),
            retry_backoff_max: self.retry_backoff_max.unwrap_or(defaults.retry_backoff_max),
        }
    }
}

impl SinkConfig {
    /// A sink of `kind` with every common key at its default.
    pub fn new(kind: SinkKind) -> SinkConfig {
        SinkConfig {
            dead_letter: None,
            buffer: BufferConfig::default(),
            batch: BatchKeys::default(),
            kind,
        }
    }

    /// The sink's type name as written in the file.
    pub fn type_name(&self) -> &'static str {
        self.kind.type_name()
    }

    /// Its computed columns (see [`SinkType::computed_columns`]).
    pub fn computed_columns(&self) -> Option<&std::collections::BTreeMap<String, String>> {
        self.kind.sink_type().computed_columns()
    }

    /// Its batch settings: the keys its table sets over its type's defaults.
    pub fn batch(&self) -> BatchConfig {
        self.batch.over(self.kind.sink_type().default_batch())
    }

    /// Where this sink puts a completed file, in words an operator can follow: `file
    /// PATH` (relative to the server's `data_dir`), `s3://BUCKET/KEY`, `stdout`. None when
    /// the template does not parse (the rules file check reports that).
    pub fn file_destination(&self, msg: &Message) -> Option<String> {
        self.kind.sink_type().file_destination(msg)
    }

    /// Builds the sink. Its configuration was checked when the rules file was read
    /// ([`Check`]); building does not check again.
    pub fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        self.kind.sink_type().build(place)
    }
}

impl Check for SinkConfig {
    fn check(&self, p: &mut Problems) {
        p.require(
            self.buffer.max_bytes >= 1024 * 1024,
            "buffer.max_bytes",
            "must be at least 1 MiB",
        );
        let batch = self.batch();
        p.require(
            batch.max_events > 0,
            "batch.max_events",
            "must be at least 1",
        );
        p.require(
            batch.max_bytes != Some(0),
            "batch.max_bytes",
            "must be at least 1 (leave it unset for no limit)",
        );
        p.require(
            batch.max_age <= Duration::from_secs(3600),
            "batch.max_age",
            "must be at most 1h",
        );
        if self.dead_letter.is_none() {
            p.require(
                batch.max_attempts == 0,
                "batch.max_attempts",
                "needs a `dead_letter` sink to give batches to (without one, batches are retried until written)",
            );
            p.require(
                batch.max_retry_age.is_none(),
                "batch.max_retry_age",
                "needs a `dead_letter` sink to give batches to (without one, batches are retried until written)",
            );
        }
        self.kind.sink_type().check(p);
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
