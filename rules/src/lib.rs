//! The rules engine: a TOML rules file compiled into a router that fans messages out to
//! sinks.
//!
//! ```toml
//! [sinks.archive]
//! type = "file"
//! path = "telemetry/{agent}/{stream}/%Y-%m-%d.jsonl"
//!
//! [[rules]]
//! name = "archive-all"
//! from = ["fleet/+/telemetry/#"]        # MQTT topic filters
//! where = 'stream != "heartbeat"'       # optional CEL condition
//! to = ["archive"]                      # one or more sinks (fan-out)
//! ```
//!
//! [`RuleSet`] parses and validates a file (every problem with `file:line:col`),
//! [`Engine`] runs it, [`run_standalone`] feeds it from any MQTT broker.

pub mod condition;
pub mod engine;
pub mod filter;
pub mod router;
pub mod ruleset;
pub mod schema;
pub mod standalone;

pub use engine::{AckPublisher, Dispatched, Engine, EngineOptions, EngineStats};
pub use filter::TopicFilter;
pub use fleetbus_sinks::SinkStatsSnapshot;
pub use ruleset::{RuleSet, RulesError, DEFAULT_RULES};
pub use standalone::{run_standalone, AckChannel, StandaloneOptions};
