//! `fleetbus serve`

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use fleetbus_config::Valid;
use fleetbus_server::{Server, ServerConfig};

/// How long a graceful stop may take.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Loads the server configuration (file + FLEETBUS_SERVER__* overrides) with paths resolved,
/// and checks it: every problem at once, each at its `file:line:col`.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Valid<ServerConfig>> {
    let config = fleetbus_config::load(
        path,
        fleetbus_config::SERVER_ENV_PREFIX,
        |c: &mut ServerConfig| c.resolve_paths(path),
    )?;
    Ok(config)
}

/// Runs the server until Ctrl-C / SIGTERM; SIGHUP reloads the rules file.
pub async fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    let server = Server::start(&config)
        .await
        .with_context(|| match config_path {
            Some(p) => format!("cannot start the server configured by {}", p.display()),
            None => "cannot start the server".to_string(),
        })?;
    let mut shutdown = super::shutdown_signal();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    loop {
        tokio::select! {
            _ = super::stopped(&mut shutdown) => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the rules file");
                // the outcome is logged, counted and kept for GET /rules
                let _ = server.reload().await;
            }
        }
    }
    server.shutdown(SHUTDOWN_DEADLINE).await;
    Ok(ExitCode::SUCCESS)
}
