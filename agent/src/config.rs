//! The agent's configuration file (`fleetbus agent --config agent.toml`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fleetbus_mqtt::BrokerUrl;
use fleetbus_protocol::validate_id;
use serde::{Deserialize, Serialize};

/// Everything an agent is configured with. Every key has a default; unknown keys are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The broker to connect to (the agent's one outbound connection).
    pub server: BrokerUrl,
    /// Where the agent keeps its id, sequence numbers and outbox.
    pub state_dir: PathBuf,
    /// Fixed agent id. When unset, an id is generated once and kept in `state_dir`.
    pub id: Option<String>,
    /// Groups the agent belongs to (for jobs sent to a group).
    pub groups: Vec<String>,
    /// Operator-defined tags, sent in the birth message.
    pub tags: BTreeMap<String, String>,
    /// System metrics collection.
    pub metrics: MetricsConfig,
    /// A small record on the `heartbeat` stream at a fixed interval (off by default).
    pub heartbeat: HeartbeatConfig,
    /// The on-disk outbox.
    pub outbox: OutboxConfig,
    /// Connection behaviour.
    pub connection: ConnectionConfig,
    /// File uploads.
    pub uploads: UploadsConfig,
    /// Jobs: the signing key to trust and the allow-listed operations.
    pub jobs: crate::job_runner::JobsConfig,
    /// Checks with Nagios semantics, by name (`[checks.NAME]`).
    pub checks: BTreeMap<String, crate::checks::CheckConfig>,
    /// What all checks share: how many run at once, the grace after SIGTERM.
    pub check_runner: crate::checks::CheckRunnerConfig,
    /// The cloud identity: which metadata service to ask.
    pub metadata: crate::metadata::MetadataConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            server: BrokerUrl::mqtt("127.0.0.1", 1883),
            state_dir: PathBuf::from("fleetbus-agent-state"),
            id: None,
            groups: Vec::new(),
            tags: BTreeMap::new(),
            metrics: MetricsConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            outbox: OutboxConfig::default(),
            connection: ConnectionConfig::default(),
            uploads: UploadsConfig::default(),
            jobs: crate::job_runner::JobsConfig::default(),
            checks: BTreeMap::new(),
            check_runner: crate::checks::CheckRunnerConfig::default(),
            metadata: crate::metadata::MetadataConfig::default(),
        }
    }
}

/// `[metrics]`: system metrics (CPU, memory, swap, disks, load, network counters).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Collect at all.
    pub enabled: bool,
    /// Time between collections (each one shifted by up to ±10% at random, and the first
    /// one delayed by a random part of the interval, so a fleet does not sample in step).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            interval: Duration::from_secs(10),
        }
    }
}

/// `[heartbeat]`: a record with a counter on the `heartbeat` stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Emit heartbeats.
    pub enabled: bool,
    /// Time between heartbeats (no jitter: heartbeats are meant to be regular).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Stop after this many heartbeats in one run (0 = never): synthetic load and tests.
    pub limit: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            enabled: false,
            interval: Duration::from_secs(1),
            limit: 0,
        }
    }
}

/// `[outbox]`: the durable queue every record passes through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Most bytes of unacknowledged records kept; beyond it the oldest are dropped, counted
    /// and reported as an event.
    pub max_bytes: u64,
    /// Size of one outbox segment file.
    pub segment_bytes: u64,
    /// Records are handed to the OS as they are written (they survive an agent crash) and
    /// published only once they are also on disk (they survive a power loss): at most this
    /// often, everything pushed since the last time is forced to disk in one fsync (group
    /// commit). Lower means less latency and more fsyncs.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: 64 * 1024 * 1024,
            segment_bytes: 4 * 1024 * 1024,
            fsync_interval: Duration::from_millis(10),
        }
    }
}

/// `[connection]`: keepalive, reconnect backoff and flow control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionConfig {
    /// MQTT keepalive: a ping after this much silence keeps NATs and proxies open.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long to wait for the broker's CONNACK.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most records sent and not yet acknowledged by the server.
    pub inflight: u16,
    /// Records sent this long ago without any acknowledgement since are sent again (the
    /// server recognises duplicates).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// The agent's secret token from `fleetbus agents enroll` (sent as the MQTT password,
    /// with the agent id as client id and user name). Prefer `token_file`.
    pub token: Option<String>,
    /// A file holding the token (read at start; surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate must chain to (`mqtts://`,
    /// `wss://`); the system's roots when unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
    /// An HTTP proxy the connection goes through (`http://host:port`, HTTP CONNECT).
    pub proxy: Option<String>,
    /// A bootstrap credential's id: with no token of its own, the agent logs in with it
    /// (and `bootstrap_token_file`), asks for a credential, keeps it in
    /// `state_dir/credential.json` and uses that from then on.
    pub bootstrap_id: Option<String>,
    /// The file holding the bootstrap token (`fleetbus agents enroll ID --role bootstrap`).
    pub bootstrap_token_file: Option<PathBuf>,
    /// The durable store this agent delivers to: a record leaves the outbox only on an
    /// acknowledgement naming it (`server`: `fleetbus serve`; a `fleetbus rules run`
    /// worker's `--store`). Acknowledgements of other stores on the same broker are ignored.
    pub store: String,
}

impl ConnectionConfig {
    /// How to reach `server`: TLS from `ca_file`/`client_cert`/`client_key`, `proxy`.
    pub fn transport(
        &self,
        server: &BrokerUrl,
    ) -> Result<fleetbus_mqtt::ClientTransport, fleetbus_mqtt::TransportError> {
        let files = fleetbus_mqtt::TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        };
        fleetbus_mqtt::ClientTransport::for_url(server, &files, self.proxy.as_deref())
    }

    /// The token to log in with: `token`, or the contents of `token_file`, or none.
    pub fn load_token(&self) -> Result<Option<String>, String> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_string()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("connection.token_file {}: {e}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("connection.token_file {}: empty", path.display()));
        }
        Ok(Some(token.to_string()))
    }
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            keepalive: Duration::from_secs(15),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            inflight: 2000,
            ack_timeout: Duration::from_secs(10),
            token: None,
            token_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            proxy: None,
            bootstrap_id: None,
            bootstrap_token_file: None,
            store: fleetbus_protocol::ack::SERVER_STORE.to_string(),
        }
    }
}

/// `[uploads]`: files sent to the server in chunks over the agent's connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadsConfig {
    /// A directory whose files are uploaded: a file is picked up once its size and
    /// modification time stayed the same for one `poll_interval` (so files still being
    /// written are left alone; write elsewhere and rename in to be safe), and removed (or
    /// moved to `archive_dir`) only after the server confirmed it. Unset: no watching.
    pub watch_dir: Option<PathBuf>,
    /// Where confirmed files from `watch_dir` go; unset: they are deleted.
    pub archive_dir: Option<PathBuf>,
    /// How often `watch_dir` is scanned.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Bytes per chunk: each chunk is one MQTT publish of at most 128 KiB with its topic
    /// and headers.
    pub chunk_size: u32,
    /// Chunks sent and not yet answered by the server, at most (flow control: bounds the
    /// memory and the delay a chunk burst adds in front of telemetry).
    pub window: usize,
    /// Upload bandwidth limit in bytes per second (unset: no limit). Telemetry is not
    /// counted and never waits for it.
    pub max_bytes_per_sec: Option<u64>,
    /// Silence from the server for this long during an upload: ask where it stands.
    #[serde(with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// First wait when the server is busy or the spool quota is full (doubling).
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest such wait.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long records of finished uploads are kept in `state_dir/uploads/`.
    #[serde(with = "humantime_serde")]
    pub remember: Duration,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        UploadsConfig {
            watch_dir: None,
            archive_dir: None,
            poll_interval: Duration::from_secs(2),
            chunk_size: fleetbus_protocol::files::DEFAULT_CHUNK_SIZE,
            window: 48,
            max_bytes_per_sec: None,
            reply_timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            remember: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The values serde cannot check: identifiers, intervals, sizes.
impl fleetbus_config::Check for AgentConfig {
    fn check(&self, p: &mut fleetbus_config::Problems) {
        if let Some(id) = &self.id {
            if let Err(e) = validate_id("id", id) {
                p.add("id", e.to_string());
            }
            p.require(
                id != fleetbus_protocol::topics::GROUPS,
                "id",
                "`groups` is reserved",
            );
        }
        for g in &self.groups {
            if let Err(e) = validate_id("group", g) {
                p.add("groups", e.to_string());
            }
        }
        if let Err(e) = validate_id("connection.store", &self.connection.store) {
            p.add("connection.store", e.to_string());
        }
        p.require(
            self.metrics.interval >= Duration::from_millis(100),
            "metrics.interval",
            "must be at least 100ms",
        );
        p.require(
            self.heartbeat.interval >= Duration::from_millis(1),
            "heartbeat.interval",
            "must be at least 1ms",
        );
        p.require(
            self.outbox.max_bytes >= 64 * 1024,
            "outbox.max_bytes",
            "must be at least 64 KiB",
        );
        p.require(
            self.outbox.segment_bytes >= 4 * 1024,
            "outbox.segment_bytes",
            "must be at least 4 KiB",
        );
        p.require(
            self.connection.inflight > 0,
            "connection.inflight",
            "must be at least 1",
        );
        p.section("uploads", |p| {
            let u = &self.uploads;
            let most = fleetbus_protocol::files::DEFAULT_CHUNK_SIZE;
            p.require(
                (1024..=most).contains(&u.chunk_size),
                "chunk_size",
                format!("must be between 1024 (the server's files.min_chunk_size) and {most} (one chunk per 128 KiB publish)"),
            );
            p.require(
                (1..=1024).contains(&u.window),
                "window",
                "must be between 1 and 1024 chunks",
            );
            p.require(
                u.max_bytes_per_sec != Some(0),
                "max_bytes_per_sec",
                "must be above 0 (leave it unset for no limit)",
            );
            p.require(
                u.poll_interval >= Duration::from_millis(10),
                "poll_interval",
                "must be at least 10ms",
            );
            p.require(
                u.reply_timeout >= Duration::from_millis(100),
                "reply_timeout",
                "must be at least 100ms",
            );
            p.require(
                u.archive_dir.is_none() || u.watch_dir.is_some(),
                "archive_dir",
                "needs uploads.watch_dir",
            );
        });
        p.section("jobs", |p| self.jobs.check(p));
        for (name, check) in &self.checks {
            p.section("checks", |p| {
                if let Err(e) = validate_id("check name", name) {
                    p.add(name, e.to_string());
                }
                p.section(name, |p| check.check(p));
            });
        }
        p.section("check_runner", |p| self.check_runner.check(p));
        p.section("metadata", |p| self.metadata.check(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_file_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ConnectionConfig::default();
        assert_eq!(c.load_token(), Ok(None));
        let file = dir.path().join("web-01.token");
        c.token_file = Some(file.clone());
        let missing = c.load_token().unwrap_err();
        assert!(
            missing.starts_with("connection.token_file") && missing.contains("web-01.token"),
            "{missing}"
        );
        std::fs::write(&file, "  \n").unwrap();
        assert!(c.load_token().unwrap_err().ends_with("empty"));
        std::fs::write(&file, "abc123\n").unwrap();
        assert_eq!(c.load_token(), Ok(Some("abc123".into())));
    }
}
