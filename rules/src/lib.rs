//! The rules language: a TOML rules file compiled into a router that says which sinks
//! each message goes to.
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
//! [`RuleSet`] parses and validates a file (every problem with `file:line:col`); the
//! [`router::Router`] decides which sinks a message goes to. No I/O here: the engine that
//! runs a rule set (write-ahead log, acknowledgements, sink workers) is the pipeline's
//! (`fleetbus-pipeline`).

pub mod aggregate;
pub mod condition;
pub mod expression;
pub mod filter;
pub mod filter_index;
pub mod record_use;
pub mod router;
pub mod rule_tests;
pub mod ruleset;
pub mod schema;
pub mod stateful;
pub mod transform;

pub use filter::TopicFilter;
pub use ruleset::{RuleSet, RulesError, DEFAULT_RULES};
