//! One module per subcommand, plus what they share (logging, signals).

pub mod acl;
pub mod admin_client;
pub mod agent;
pub mod agents;
pub mod bench;
pub mod demo;
pub mod job;
pub mod keys;
pub mod rules;
pub mod serve;
pub mod table;

use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `RUST_LOG` (default: info; rumqttd's own logs, which report
/// every ordinary disconnect as an error, only from `RUST_LOG=rumqttd=warn`). `quiet`
/// (demo, bench) shows warnings only unless `RUST_LOG` says otherwise.
pub fn init_logging(quiet: bool) {
    let default = if quiet {
        "warn,rumqttd=off"
    } else {
        "info,rumqttd=off"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // colour only for a person at a terminal: a log file or a journal gets plain text
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// A channel that turns true on Ctrl-C or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Resolves once `rx` turns true.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
