//! Checks with Nagios semantics: what a plugin's exit code and output mean, and the
//! threshold ranges checks and performance data share. (The runner that schedules and
//! runs checks builds on these.)

pub mod plugin_output;
pub mod range;
pub mod state;

pub use plugin_output::{PerfDatum, PluginOutput};
pub use range::{Range, RangeError};
pub use state::CheckState;
