//! The `console` sink: event records folded into the event console
//! ([`fleetbus_console`]): an SQLite file in the server's data directory
//! (`console.sqlite` unless `path` says otherwise), or a PostgreSQL database with `url`
//! ([`pg`]). The admin endpoint and `fleetbus events` read and change the same console,
//! named by the server's `[console]` with the same keys ([`ConsoleLocation`]).
//!
//! Exactly once: each batch's events and the log position after it commit in one
//! transaction, and a batch is folded from that position on, so a batch written again
//! after a crash or a retry counts nothing twice. A check result (a record with `check`
//! and no `event`) is kept as its check's latest result, for `fleetbus agents show`. A
//! message that is neither is refused for good (dead letter). Closed rows older than `retention` are
//! deleted, at most once a minute, after a write.

pub mod pg;
pub mod store;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetbus_config::Problems;
use fleetbus_console::{CheckUpdate, Incoming};
use fleetbus_protocol::{Event, Message};
use serde::{Deserialize, Serialize};

pub use store::{ConsoleLocation, Store};

use crate::config::{SinkPlace, SinkType};
use crate::{Batch, BoxFuture, Item, Sink, SinkError};

/// `type = "console"`: events folded into the event console.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSinkConfig {
    /// The console's SQLite file, under the server's `data_dir` when relative.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// A PostgreSQL database instead of the file.
    #[serde(default)]
    pub url: Option<String>,
    /// Its password: `{ env = "NAME" }` or `{ file = "/path" }`.
    #[serde(default)]
    pub password: Option<crate::secret::Secret>,
    /// CA certificates (PEM) that sign the database server's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long connecting, or one write, may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long closed rows are kept.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Open rows one agent may have; an event that would open one more folds into the
    /// agent's overflow row.
    #[serde(default = "default_max_open")]
    pub max_open_per_agent: u32,
}

/// The console's file unless configured otherwise (the server's `[console] path` too).
pub fn default_path() -> PathBuf {
    ConsoleLocation::default().path
}

fn default_timeout() -> Duration {
    ConsoleLocation::default().timeout
}

fn default_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

fn default_max_open() -> u32 {
    fleetbus_console::DEFAULT_MAX_OPEN_PER_AGENT
}

/// How often closed rows past their retention are looked for.
const PURGE_EVERY: Duration = Duration::from_secs(60);

impl ConsoleSinkConfig {
    /// Where the console is.
    pub fn location(&self) -> ConsoleLocation {
        ConsoleLocation {
            path: self.path.clone(),
            url: self.url.clone(),
            password: self.password.clone(),
            ca_file: self.ca_file.clone(),
            timeout: self.timeout,
        }
    }
}

impl SinkType for ConsoleSinkConfig {
    fn check(&self, p: &mut Problems) {
        self.location().check(p);
        p.require(
            self.retention >= Duration::from_secs(60),
            "retention",
            "must be at least 1m",
        );
        p.require(
            (1..=1_000_000).contains(&self.max_open_per_agent),
            "max_open_per_agent",
            "must be between 1 and 1,000,000",
        );
    }

    fn file_destination(&self, _msg: &Message) -> Option<String> {
        None
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        let store = self
            .location()
            .store(place.data_dir, self.max_open_per_agent)
            .map_err(|e| SinkError::Config(format!("sink `{}`: {e}", place.name)))?;
        Ok(Box::new(ConsoleSink {
            name: place.name.to_string(),
            store,
            retention: self.retention,
            purged: Mutex::new(None),
        }))
    }
}

/// Folds event records into the console (see the module documentation).
pub struct ConsoleSink {
    name: String,
    store: Store,
    retention: Duration,
    /// When closed rows were last purged.
    purged: Mutex<Option<Instant>>,
}

/// What one message gives the console.
enum Entry {
    /// An event to fold.
    Event(Incoming),
    /// A check's result to keep as its latest.
    Check(CheckUpdate),
}

/// The event (or else the check result) an item carries, or why it has neither.
fn entry(item: &Item) -> Result<Entry, String> {
    if item.dead_letter().is_some() {
        return Err("a dead letter is not an event".into());
    }
    let msg = item.message().map_err(|e| e.to_string())?;
    let agent = msg
        .agent()
        .ok_or("no agent: only records from an agent fold into the console")?;
    let Some(event) = msg.body.get("event") else {
        let check = msg.body.get("check").ok_or(
            "neither `event` nor `check`: only event records and check results go into the console",
        )?;
        let check: fleetbus_protocol::CheckResult =
            serde_json::from_value(check.clone()).map_err(|e| format!("`check`: {e}"))?;
        return Ok(Entry::Check(CheckUpdate {
            agent: agent.to_string(),
            ts: msg.timestamp(),
            name: check.name,
            status: check.status.code(),
            state_type: match check.state_type {
                fleetbus_protocol::StateType::Soft => "soft".into(),
                fleetbus_protocol::StateType::Hard => "hard".into(),
            },
            output: check.output.chars().take(1024).collect(),
        }));
    };
    let event: Event =
        serde_json::from_value(event.clone()).map_err(|e| format!("`event`: {e}"))?;
    let tags = msg
        .body
        .get("tags")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .unwrap_or_default();
    Ok(Entry::Event(Incoming {
        agent: agent.to_string(),
        ts: msg.timestamp(),
        event,
        tags,
        groups: item.groups().to_vec(),
    }))
}

impl ConsoleSink {
    /// Whether it is time to look for closed rows past their retention.
    fn purge_due(&self) -> bool {
        let mut purged = self.purged.lock().unwrap_or_else(|p| p.into_inner());
        if purged.is_some_and(|at| at.elapsed() < PURGE_EVERY) {
            return false;
        }
        *purged = Some(Instant::now());
        true
    }
}

impl Sink for ConsoleSink {
    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut events = Vec::with_capacity(batch.items.len());
            let mut checks = Vec::new();
            let mut refused = Vec::new();
            let mut why = None;
            for (n, item) in batch.items.iter().enumerate() {
                match entry(item) {
                    Ok(Entry::Event(e)) => events.push((item.index, e)),
                    Ok(Entry::Check(c)) => checks.push((item.index, c)),
                    Err(e) => {
                        if why.get_or_insert_with(|| e.clone()) == &e {
                            refused.push(n);
                        }
                    }
                }
            }
            if let Some(why) = why {
                return Err(SinkError::Refused(why).for_items(refused));
            }
            self.store
                .fold(&self.name, events, checks, batch.next)
                .await
                .map_err(|e| SinkError::Remote(e.to_string()))?;
            if self.purge_due() {
                let before = chrono::Utc::now()
                    - chrono::Duration::from_std(self.retention).unwrap_or(chrono::Duration::MAX);
                match self.store.purge(before).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(sink = %self.name, rows = n, "event console: closed rows past their retention deleted")
                    }
                    Err(e) => {
                        tracing::warn!(sink = %self.name, error = %e, "event console: purge failed")
                    }
                }
            }
            Ok(())
        })
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        Box::pin(async move {
            match self.store.position(&self.name).await {
                Ok(stored) => Ok(saved.max(stored)),
                Err(e) => {
                    // unreachable now: start from the saved position; each write skips
                    // the events the console already holds
                    tracing::warn!(sink = %self.name, error = %e, "event console not reachable at start; retrying with every write");
                    Ok(saved)
                }
            }
        })
    }

    fn exactly_once(&self) -> bool {
        true
    }
}
