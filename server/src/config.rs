//! The server's configuration file (`fleetbus serve --config server.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetbus_broker::BrokerConfig;
use fleetbus_config::{Check, Problems};
use fleetbus_pipeline::EngineOptions;
use serde::{Deserialize, Serialize};

/// Everything `fleetbus serve` is configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where sinks write (relative file sink paths resolve here).
    pub data_dir: PathBuf,
    /// The embedded broker.
    pub broker: BrokerConfig,
    /// The rules engine.
    pub rules: RulesSection,
    /// The write-ahead log.
    pub wal: WalSection,
    /// The metrics endpoint.
    pub metrics: MetricsSection,
    /// File uploads: limits and retention.
    pub files: crate::file_service::FilesSection,
    /// Jobs: the signing key.
    pub jobs: JobsSection,
    /// The admin endpoint (jobs API for `fleetbus job ...`).
    pub admin: AdminSection,
    /// Bounds of the HTTP endpoints (metrics, admin).
    pub http: HttpSection,
    /// `[console]`: where the event console the admin endpoint serves (`fleetbus events
    /// ...`) is kept: the same keys, and the same place, as the `console` sink's (`path`
    /// under `data_dir`, or a PostgreSQL `url`).
    pub console: fleetbus_sinks::console::ConsoleLocation,
}

/// `[http]`: what one client may hold of an HTTP endpoint (metrics, admin), each endpoint
/// on its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Longest time to send a request's headers, and to begin the next request on a
    /// kept-alive connection (idle and slow-loris connections are closed after it).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest life of one connection, its requests included.
    #[serde(with = "humantime_serde")]
    pub connection_lifetime: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(60),
            max_body_bytes: 256 * 1024,
        }
    }
}

/// `[jobs]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSection {
    /// The Ed25519 secret key that signs every job (`fleetbus keys generate`); unset = the
    /// job service is off.
    pub signing_key: Option<PathBuf>,
    /// How long a signed run command is valid after it was sent: every send (the push, a
    /// re-send when an agent reconnects, a rollout step) is signed afresh, and agents
    /// refuse a command past it (plus 5 minutes of clock difference), so a command
    /// captured on the wire cannot be replayed later.
    #[serde(with = "humantime_serde")]
    pub command_ttl: Duration,
    /// How long an execution may stay QUEUED after it was last sent to its agent: past it
    /// the execution ends TIMED_OUT ("never started"), so a job for an agent that never
    /// comes back still ends. Every reconnect of the agent sends it again and restarts
    /// the clock.
    #[serde(with = "humantime_serde")]
    pub offline_expiry: Duration,
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            signing_key: None,
            command_ttl: fleetbus_jobs::DEFAULT_COMMAND_TTL,
            offline_expiry: fleetbus_jobs::DEFAULT_OFFLINE_EXPIRY,
        }
    }
}

/// `[admin]`: the HTTP endpoint the `fleetbus job` commands talk to. Every request needs
/// an operator token (`Authorization: Bearer ...`, a credential of role `operator` from
/// `fleetbus agents enroll NAME --role operator`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Where the admin API listens; unset = no endpoint.
    pub listen: Option<std::net::SocketAddr>,
    /// Host names (with port, as in the `Host` header) requests may name besides the
    /// listen address itself and, on loopback, `localhost:PORT`: a request naming any
    /// other host is refused (a web page must not reach the endpoint by DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 7070))),
            allowed_hosts: Vec::new(),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Where `GET /metrics` is served (e.g. `127.0.0.1:9464`); unset = no endpoint.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[wal]`: the server's write-ahead log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    /// Longest time an accepted record waits for its group commit (fsync, then the
    /// acknowledgement to the agent).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How often the de-duplication state is saved and the log truncated below the slowest
    /// sink.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// Size of one log segment file.
    pub segment_bytes: u64,
    /// The name this store gives its acknowledgements: agents remove a record only on an
    /// acknowledgement from the store they deliver to (their `connection.store`).
    pub store: String,
    /// Streams the de-duplication state remembers per agent: a record of one more makes
    /// the agent's least recently used stream forgotten.
    pub max_streams_per_agent: usize,
    /// A stream with no record for this long is forgotten by the de-duplication state (a
    /// record of it re-sent later is stored again).
    #[serde(with = "humantime_serde")]
    pub dedup_idle: Duration,
}

impl Default for WalSection {
    fn default() -> Self {
        let d = EngineOptions::default();
        WalSection {
            commit_interval: d.commit_interval,
            snapshot_interval: d.snapshot_interval,
            segment_bytes: d.wal.segment_bytes,
            store: d.store,
            max_streams_per_agent: d.dedup.max_streams_per_agent,
            dedup_idle: Duration::from_millis(d.dedup.idle_ms as u64),
        }
    }
}

/// `[rules]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesSection {
    /// The rules file. When unset, the built-in rules archive all telemetry to files and
    /// feed the event console.
    pub file: Option<PathBuf>,
    /// Reload the file whenever its contents change (looked at every second), as SIGHUP
    /// does.
    pub watch: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("fleetbus-data"),
            broker: BrokerConfig::default(),
            rules: RulesSection::default(),
            wal: WalSection::default(),
            metrics: MetricsSection::default(),
            files: crate::file_service::FilesSection::default(),
            jobs: JobsSection::default(),
            admin: AdminSection::default(),
            http: HttpSection::default(),
            console: fleetbus_sinks::console::ConsoleLocation::default(),
        }
    }
}

/// Everything serde cannot check, every problem at its key path.
impl Check for ServerConfig {
    fn check(&self, p: &mut Problems) {
        p.section("broker", |p| self.broker.check(p));
        p.section("files", |p| self.files.check(p));
        p.section("jobs", |p| {
            let jobs = &self.jobs;
            p.require(
                jobs.offline_expiry >= Duration::from_secs(1),
                "offline_expiry",
                "must be at least 1s",
            );
            p.require(
                jobs.command_ttl >= Duration::from_secs(10),
                "command_ttl",
                "must be at least 10s",
            );
        });
        p.section("wal", |p| {
            let wal = &self.wal;
            p.require(
                wal.commit_interval <= Duration::from_secs(1),
                "commit_interval",
                "must be at most 1s (agents wait for it)",
            );
            p.require(
                wal.snapshot_interval >= Duration::from_millis(100),
                "snapshot_interval",
                "must be at least 100ms (each snapshot writes and fsyncs the de-duplication state)",
            );
            if let Err(e) = fleetbus_protocol::validate_id("wal.store", &wal.store) {
                p.add("store", e.to_string());
            }
            p.require(
                wal.max_streams_per_agent > 0,
                "max_streams_per_agent",
                "must be at least 1",
            );
            p.require(
                wal.dedup_idle >= Duration::from_secs(3600),
                "dedup_idle",
                "must be at least 1h (agents re-send unacknowledged records for longer)",
            );
            p.require(
                wal.segment_bytes >= 1024 * 1024,
                "segment_bytes",
                "must be at least 1 MiB",
            );
        });
        p.section("http", |p| {
            let http = &self.http;
            p.require(
                http.max_connections > 0,
                "max_connections",
                "must be at least 1",
            );
            p.require(
                !http.header_timeout.is_zero() && http.header_timeout <= http.connection_lifetime,
                "header_timeout",
                "must be above 0 and at most http.connection_lifetime",
            );
            p.require(
                http.max_body_bytes >= 1024,
                "max_body_bytes",
                "must be at least 1024",
            );
        });
        p.section("console", |p| self.console.check(p));
    }
}

impl ServerConfig {
    /// The engine options these settings describe.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            commit_interval: self.wal.commit_interval,
            snapshot_interval: self.wal.snapshot_interval,
            wal: fleetbus_wal::WalOptions {
                segment_bytes: self.wal.segment_bytes,
            },
            store: self.wal.store.clone(),
            dedup: fleetbus_wal::DedupLimits {
                max_streams_per_agent: self.wal.max_streams_per_agent,
                idle_ms: self.wal.dedup_idle.as_millis().min(i64::MAX as u128) as i64,
            },
        }
    }

    /// Makes relative `data_dir` and `rules.file` relative to the configuration file's
    /// directory (so a config works wherever the server is started from).
    pub fn resolve_paths(&mut self, config_file: Option<&Path>) {
        self.data_dir = fleetbus_config::relative_to(config_file, &self.data_dir);
        if let Some(f) = &self.rules.file {
            self.rules.file = Some(fleetbus_config::relative_to(config_file, f));
        }
        if let Some(f) = &self.jobs.signing_key {
            self.jobs.signing_key = Some(fleetbus_config::relative_to(config_file, f));
        }
        let tls = &mut self.broker.tls;
        for file in [
            &mut self.broker.security.policy,
            &mut tls.cert,
            &mut tls.key,
            &mut tls.client_ca,
        ] {
            if let Some(f) = file.as_ref() {
                *file = Some(fleetbus_config::relative_to(config_file, f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once_and_nothing_is_clamped() {
        let mut c = ServerConfig::default();
        c.wal.snapshot_interval = Duration::from_millis(10);
        c.wal.commit_interval = Duration::from_secs(2);
        c.broker.max_inflight = 0;
        c.files.ttl = Duration::ZERO;
        c.http.max_body_bytes = 1;
        let shown: Vec<String> = fleetbus_config::problems_of(&c)
            .iter()
            .map(|p| p.to_string())
            .collect();
        let keys: Vec<&str> = shown
            .iter()
            .map(|s| s.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "broker.max_inflight",
                "files.ttl",
                "wal.commit_interval",
                "wal.snapshot_interval",
                "http.max_body_bytes"
            ],
            "{shown:#?}"
        );
        assert!(fleetbus_config::problems_of(&ServerConfig::default()).is_empty());
    }
}
