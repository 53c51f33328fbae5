//! The running rules engine: decodes each message, routes it, and queues it on every sink
//! it goes to. Each sink runs as its own task (see `fleetbus_sinks::worker`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetbus_config::ConfigError;
use fleetbus_protocol::Message;
use fleetbus_sinks::{spawn_sink, SinkHandle, SinkStatsSnapshot};

use crate::router::Router;
use crate::ruleset::{RuleSet, RulesError};

/// Engine-wide counters.
#[derive(Debug, Default)]
struct EngineCounters {
    received: AtomicU64,
    decode_errors: AtomicU64,
    unrouted: AtomicU64,
}

/// A copy of every counter of the engine at one moment.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Messages handed to the engine.
    pub received: u64,
    /// Messages whose payload could not be decoded (logged and skipped).
    pub decode_errors: u64,
    /// Messages no rule matched.
    pub unrouted: u64,
    /// (rule, matched, condition errors) per rule.
    pub rules: Vec<(String, u64, u64)>,
    /// Counters per sink.
    pub sinks: Vec<(String, SinkStatsSnapshot)>,
}

/// The rules engine with its sinks running.
pub struct Engine {
    router: Router,
    filters: Vec<String>,
    sinks: Vec<SinkHandle>,
    counters: EngineCounters,
}

impl Engine {
    /// Builds every sink of `rules` (file sinks write under `data_dir`) and starts their
    /// workers on the current tokio runtime.
    pub fn start(rules: RuleSet, data_dir: &Path) -> Result<Engine, RulesError> {
        let filters = rules.filters();
        let mut sinks = Vec::new();
        for (name, config) in &rules.sinks {
            let sink = config.build(data_dir).map_err(|e| {
                ConfigError::invalid(Path::new("<rules>"), format!("sink `{name}`: {e}"))
            })?;
            sinks.push(spawn_sink(
                name,
                sink,
                config.buffer().max_events,
                config.batch().clone(),
            ));
        }
        Ok(Engine {
            router: Router::new(rules.rules),
            filters,
            sinks,
            counters: EngineCounters::default(),
        })
    }

    /// The topic filters the engine must be subscribed to.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Routes one published message.
    pub fn dispatch(&self, topic: &str, payload: &[u8]) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let msg = match Message::decode(topic, payload) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let n = self.counters.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%topic, error = %e, bytes = payload.len(), undecodable_total = n, "message skipped: payload is neither a record nor JSON");
                }
                return;
            }
        };
        let mut targets = Vec::new();
        self.router.route(&msg, &mut targets);
        if targets.is_empty() {
            self.counters.unrouted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for i in targets {
            if let Some(sink) = self.sinks.get(i) {
                sink.offer(msg.clone());
            }
        }
    }

    /// Every counter.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            received: self.counters.received.load(Ordering::Relaxed),
            decode_errors: self.counters.decode_errors.load(Ordering::Relaxed),
            unrouted: self.counters.unrouted.load(Ordering::Relaxed),
            rules: self.router.stats(),
            sinks: self
                .sinks
                .iter()
                .map(|s| (s.name().to_string(), s.stats().snapshot()))
                .collect(),
        }
    }

    /// Stops the sinks after they wrote and flushed what is queued, within `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        for sink in self.sinks {
            sink.close(deadline).await;
        }
    }
}
