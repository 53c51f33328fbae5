//! `fleetbus agent`

use std::path::Path;
use std::process::ExitCode;

use fleetbus_agent::{Agent, AgentConfig};

/// Loads the agent configuration (file + FLEETBUS_* overrides); a relative `state_dir`
/// is resolved against the configuration file's directory.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<AgentConfig> {
    let mut config: AgentConfig = fleetbus_config::load(path)?;
    config.state_dir = fleetbus_config::relative_to(path, &config.state_dir);
    Ok(config)
}

/// Runs the agent until Ctrl-C / SIGTERM.
pub async fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    let agent = Agent::open(config)?;
    agent.run(super::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
