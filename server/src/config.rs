//! The server's configuration file (`fleetbus serve --config server.toml`).

use std::path::{Path, PathBuf};

use fleetbus_broker::BrokerConfig;
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
}

/// `[rules]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesSection {
    /// The rules file. When unset, the built-in rules archive all telemetry to files.
    pub file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("fleetbus-data"),
            broker: BrokerConfig::default(),
            rules: RulesSection::default(),
        }
    }
}

impl ServerConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.broker.validate().map_err(|e| e.to_string())
    }

    /// Makes relative `data_dir` and `rules.file` relative to the configuration file's
    /// directory (so a config works wherever the server is started from).
    pub fn resolve_paths(&mut self, config_file: Option<&Path>) {
        self.data_dir = fleetbus_config::relative_to(config_file, &self.data_dir);
        if let Some(f) = &self.rules.file {
            self.rules.file = Some(fleetbus_config::relative_to(config_file, f));
        }
    }
}
