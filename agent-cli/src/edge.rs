//! What every fleetbus binary does at its edge: logs to stderr, turns Ctrl-C and SIGTERM
//! into a stop signal, and prints an error with each cause said once.

use std::future::Future;
use std::process::ExitCode;

use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `RUST_LOG` (default: info; rumqttd's own logs, which report
/// every ordinary disconnect as an error, only from `RUST_LOG=rumqttd=warn`). `quiet`
/// (demo, bench, a one-shot upload) shows warnings only unless `RUST_LOG` says otherwise.
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

/// `e` and its causes, each said once: many of our errors already end with their cause's
/// text (`open /x: No such file or directory (os error 2)`), which anyhow's `{:#}` would
/// repeat after them.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

/// Runs `work` on a new multi-threaded runtime (`worker_threads` of them, or one per core)
/// and turns its result into the process's exit code, printing an error with
/// [`error_chain`]. Blocked threads are not waited for at the end (rumqttd's router has
/// no shutdown).
pub fn run_async(
    worker_threads: Option<usize>,
    work: impl Future<Output = anyhow::Result<ExitCode>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(work);
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
