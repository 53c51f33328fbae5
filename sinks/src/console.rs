//! The `console` sink: event records folded into the event console
//! ([`fleetbus_console`]), an SQLite file in the server's data directory
//! (`console.sqlite` unless `path` says otherwise; the admin endpoint and `fleetbus
//! events` read and change the same file, `[console] path` in the server's configuration).
//!
//! Exactly once: each batch's events and the log position after it commit in one
//! transaction, and a batch is folded from that position on, so a batch written again
//! after a crash or a retry counts nothing twice. A message that is not an event record
//! (no `event`) is refused for good (dead letter). Closed rows older than `retention` are
//! deleted, at most once a minute, after a write.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetbus_config::Problems;
use fleetbus_console::{Console, Incoming};
use fleetbus_protocol::{Event, Message};
use serde::{Deserialize, Serialize};

use crate::config::{SinkPlace, SinkType};
use crate::{Batch, BoxFuture, Item, Sink, SinkError};

/// `type = "console"`: events folded into the event console.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSinkConfig {
    /// The console's database file, under the server's `data_dir` when relative.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// How long closed rows are kept.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Open rows one agent may have; an event that would open one more folds into the
    /// agent's overflow row.
    #[serde(default = "default_max_open")]
    pub max_open_per_agent: u32,
}

fn default_max_open() -> u32 {
    fleetbus_console::DEFAULT_MAX_OPEN_PER_AGENT
}

/// The console's file unless configured otherwise (the server's `[console] path` too).
pub fn default_path() -> PathBuf {
    PathBuf::from("console.sqlite")
}

fn default_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

/// How often closed rows past their retention are looked for.
const PURGE_EVERY: Duration = Duration::from_secs(60);

impl SinkType for ConsoleSinkConfig {
    fn check(&self, p: &mut Problems) {
        p.require(
            !self.path.as_os_str().is_empty(),
            "path",
            "is empty: name the console's database file",
        );
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
        Ok(Box::new(ConsoleSink {
            inner: Arc::new(Inner {
                name: place.name.to_string(),
                path: place.data_dir.join(&self.path),
                retention: self.retention,
                max_open: self.max_open_per_agent,
                console: Mutex::new(None),
                purged: Mutex::new(None),
            }),
        }))
    }
}

/// Folds event records into the console (see the module documentation).
pub struct ConsoleSink {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    path: PathBuf,
    retention: Duration,
    max_open: u32,
    /// Opened at the first use and again after an error.
    console: Mutex<Option<Console>>,
    /// When closed rows were last purged.
    purged: Mutex<Option<Instant>>,
}

impl ConsoleSink {
    async fn with_console<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Console) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let me = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = me.console.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                let console = Console::open(&me.path)
                    .map_err(|e| SinkError::Remote(e.to_string()))?
                    .with_limit(me.max_open);
                *guard = Some(console);
            }
            let Some(console) = guard.as_mut() else {
                return Err(SinkError::Remote("event console: not open".into()));
            };
            let result = f(&me, console);
            if result.is_err() {
                *guard = None;
            }
            result
        })
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
    }
}

/// The event an item carries, or why it has none.
fn incoming(item: &Item) -> Result<Incoming, String> {
    if item.dead_letter().is_some() {
        return Err("a dead letter is not an event".into());
    }
    let msg = item.message().map_err(|e| e.to_string())?;
    let event = msg
        .body
        .get("event")
        .ok_or("no `event`: only event records fold into the console")?;
    let event: Event =
        serde_json::from_value(event.clone()).map_err(|e| format!("`event`: {e}"))?;
    let agent = msg
        .agent()
        .ok_or("no agent: only records from an agent fold into the console")?;
    let tags = msg
        .body
        .get("tags")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .unwrap_or_default();
    Ok(Incoming {
        agent: agent.to_string(),
        ts: msg.timestamp(),
        event,
        tags,
        groups: item.groups().to_vec(),
    })
}

impl Sink for ConsoleSink {
    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut events = Vec::with_capacity(batch.items.len());
            let mut refused = Vec::new();
            let mut why = None;
            for (n, item) in batch.items.iter().enumerate() {
                match incoming(item) {
                    Ok(e) => events.push((item.index, e)),
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
            let next = batch.next;
            self.with_console(move |sink, console| {
                console
                    .fold(&sink.name, &events, next)
                    .map_err(|e| SinkError::Remote(e.to_string()))?;
                let mut purged = sink.purged.lock().unwrap_or_else(|p| p.into_inner());
                if purged.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
                    *purged = Some(Instant::now());
                    let before = chrono::Utc::now()
                        - chrono::Duration::from_std(sink.retention).unwrap_or(chrono::Duration::MAX);
                    match console.purge(before) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(sink = %sink.name, rows = n, "event console: closed rows past their retention deleted"),
                        Err(e) => tracing::warn!(sink = %sink.name, error = %e, "event console: purge failed"),
                    }
                }
                Ok(())
            })
            .await
        })
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        Box::pin(async move {
            let stored = self
                .with_console(|sink, console| {
                    console
                        .position(&sink.name)
                        .map_err(|e| SinkError::Remote(e.to_string()))
                })
                .await?;
            Ok(saved.max(stored))
        })
    }

    fn exactly_once(&self) -> bool {
        true
    }
}
