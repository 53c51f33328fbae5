//! The agent's command line, shared by two binaries: `fleetbus-agent`, the lean one that
//! runs on every machine of a fleet (no broker, no S3 SDK, no SQLite, no benchmarks), and
//! `fleetbus agent` in the full `fleetbus` binary. Both run the same [`commands`], and
//! both binaries meet the world through [`edge`] (logging, signals, error text).

pub mod commands;
pub mod edge;

pub use commands::{load_config, run, AgentArgs};
