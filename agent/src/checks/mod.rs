//! Checks with Nagios semantics: plugins run on a schedule ([`runner`]), their output read
//! ([`plugin_output`], [`outcome`]), their SOFT/HARD states and flapping tracked
//! ([`tracker`]), results and events pushed to the outbox as records.

pub mod builtin;
pub mod config;
pub mod outcome;
pub mod passive;
pub mod plugin_output;
pub mod runner;
pub mod schedule;
pub mod tracker;

pub use config::{CheckConfig, CheckRunnerConfig};
pub use fleetbus_protocol::check::{CheckResult, CheckState, StateType};
pub use fleetbus_protocol::range::{Range, RangeError};
pub use plugin_output::{PerfDatum, PluginOutput};
pub use runner::{CheckCounts, CheckRunner};
