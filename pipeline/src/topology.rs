//! What the engine routes by at one moment: the compiled rules and the sinks they name,
//! with each sink's counters and limit. A reload builds a new one and swaps it in under
//! the ingest lock, so every message is routed wholly by one generation of the rules.

use std::sync::Arc;

use fleetbus_rules::router::Router;
use fleetbus_sinks::SinkConfig;

use crate::worker::SinkStats;

/// One generation of the rules and sinks.
pub(crate) struct Topology {
    /// 1 at start, one more per reload that took effect.
    pub generation: u64,
    /// The rules.
    pub router: Router,
    /// The topic filters of every rule.
    pub filters: Vec<String>,
    /// The sinks' names, in the rule set's order (the router's sink indexes).
    pub sink_names: Vec<String>,
    /// Each sink's configuration (same order).
    pub sink_configs: Vec<SinkConfig>,
    /// Each sink's counters (same order; shared with its worker, and kept by a reload for a
    /// sink of the same name).
    pub sink_stats: Vec<Arc<SinkStats>>,
    /// Each sink's backlog limit (`buffer.max_bytes`).
    pub sink_limits: Vec<u64>,
    /// Index of the built-in dead-letter sink.
    pub dead_letters_sink: usize,
}

impl Topology {
    /// The index of sink `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.sink_names.iter().position(|n| n == name)
    }
}

/// True when two configurations of a sink are the same (every key, as parsed): a reload
/// leaves such a sink running as it is.
pub(crate) fn same_config(a: &SinkConfig, b: &SinkConfig) -> bool {
    // every part of a sink's configuration derives Debug from its fields (secrets are
    // references to a variable or a file, never the secret itself)
    format!("{a:?}") == format!("{b:?}")
}
