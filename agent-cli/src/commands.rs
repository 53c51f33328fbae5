//! The agent's commands: run (`fleetbus-agent`, `fleetbus agent`), `upload`, `submit`,
//! `reset-identity`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetbus_agent::{
    AfterUpload, Agent, AgentConfig, AgentError, UploadOutcome, UploadQueue, Valid,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

/// `fleetbus agent [--config FILE] [upload ...]`
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Agent configuration file (TOML). Without it: built-in defaults and FLEETBUS_* variables.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<AgentCommand>,
}

impl AgentArgs {
    /// True for `fleetbus agent upload` (one-shot: quiet logs under a progress bar).
    pub fn is_upload(&self) -> bool {
        matches!(self.command, Some(AgentCommand::Upload { .. }))
    }
}

/// What `fleetbus agent` does besides running.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Give this machine a new agent identity (on a cloned machine that shares its id with
    /// the original): the state directory is kept aside, renamed, and a new id is made.
    /// The agent must not be running; enroll the new id before starting it.
    ResetIdentity,
    /// Upload one file to the server (chunked, verified, resumable) and wait until the
    /// server confirmed it. If the agent is already running with the same state_dir, the
    /// file is handed to it.
    Upload {
        /// The file.
        file: PathBuf,
        /// Metadata carried with the file (repeatable): rules can route on it.
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
    },
    /// Submit a passive check result. It waits in the state directory until the agent
    /// (running now or started later) sends it through its outbox, so nothing is lost
    /// while the server is away.
    Submit {
        /// The check: a `[checks.NAME]` of the configuration.
        #[arg(long)]
        check: String,
        /// 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=3))]
        status: u8,
        /// The output as a plugin prints it: text, then `|` and performance data, then
        /// long text lines.
        #[arg(long, default_value = "")]
        output: String,
    },
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Loads the agent configuration (file + FLEETBUS_AGENT__* overrides) and checks it;
/// relative paths are resolved against the configuration file's directory.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Valid<AgentConfig>> {
    load_config_with(path, |_| {})
}

/// [`load_config`] with `adjust` applied before the check (a command that needs less of
/// the agent turns parts off).
fn load_config_with(
    path: Option<&Path>,
    adjust: impl FnOnce(&mut AgentConfig),
) -> anyhow::Result<Valid<AgentConfig>> {
    let config = fleetbus_config::load(path, fleetbus_config::AGENT_ENV_PREFIX, |config| {
        resolve_paths(config, path);
        adjust(config);
    })?;
    Ok(config)
}

/// Makes the configuration's relative paths relative to its file's directory.
fn resolve_paths(config: &mut AgentConfig, path: Option<&Path>) {
    config.state_dir = fleetbus_config::relative_to(path, &config.state_dir);
    if let Some(d) = &config.uploads.watch_dir {
        config.uploads.watch_dir = Some(fleetbus_config::relative_to(path, d));
    }
    if let Some(d) = &config.uploads.archive_dir {
        config.uploads.archive_dir = Some(fleetbus_config::relative_to(path, d));
    }
    if let Some(f) = &config.jobs.public_key_file {
        config.jobs.public_key_file = Some(fleetbus_config::relative_to(path, f));
    }
    let connection = &mut config.connection;
    for file in [
        &mut connection.token_file,
        &mut connection.ca_file,
        &mut connection.client_cert,
        &mut connection.client_key,
        &mut connection.bootstrap_token_file,
    ] {
        if let Some(f) = file.as_ref() {
            *file = Some(fleetbus_config::relative_to(path, f));
        }
    }
}

/// Runs `fleetbus agent ...`.
pub async fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        None => {
            let config = load_config(args.config.as_deref())?;
            let agent = Agent::open(config)?;
            agent.run(crate::edge::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(AgentCommand::ResetIdentity) => {
            let config = load_config(args.config.as_deref())?;
            let reset = fleetbus_agent::identity::reset(&config)?;
            println!("{}", reset.new_id);
            eprintln!(
                "new agent id {} (was {}); the old state is kept in {}.\n\
                 Enroll the new id on the server (fleetbus agents enroll {} --groups ...) and \
                 point connection.token_file at its token before starting the agent.",
                reset.new_id,
                reset.old_id.as_deref().unwrap_or("none"),
                reset.kept_in.display(),
                reset.new_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(AgentCommand::Upload { file, meta }) => {
            upload(args.config.as_deref(), &file, meta.into_iter().collect()).await
        }
        Some(AgentCommand::Submit {
            check,
            status,
            output,
        }) => submit(args.config.as_deref(), check, status, output),
    }
}

/// Writes a passive result for the agent to send.
fn submit(
    config_path: Option<&Path>,
    check: String,
    status: u8,
    output: String,
) -> anyhow::Result<ExitCode> {
    use fleetbus_agent::checks::{passive, CheckState};
    let config = load_config(config_path)?;
    if !config.checks.contains_key(&check) {
        let known: Vec<&str> = config.checks.keys().map(String::as_str).collect();
        anyhow::bail!(
            "no check `{check}` in the agent's configuration (configured: {}); add a [checks.{check}] table",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        );
    }
    let status = CheckState::of_code(status).context("status must be 0 to 3")?;
    let submission = passive::Submission::now(check, status, output);
    let path = passive::submit(&config.state_dir, &submission)?;
    eprintln!(
        "submitted {} {status} ({}); the agent sends it",
        submission.check,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// One-shot upload with a progress bar.
async fn upload(
    config_path: Option<&Path>,
    file: &Path,
    meta: BTreeMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let config = load_config_with(config_path, |config| {
        // only the upload: no collectors, no directory watching
        config.metrics.enabled = false;
        config.heartbeat.enabled = false;
        config.uploads.watch_dir = None;
        config.uploads.archive_dir = None;
    })?;
    let state_dir = config.state_dir.clone();

    let hashing = spinner(&format!("hashing {}", file.display()));
    let chunk_size = config.uploads.chunk_size;
    let path = file.to_path_buf();
    let job = tokio::task::spawn_blocking(move || {
        UploadQueue::prepare(&path, chunk_size, meta, AfterUpload::Keep)
    })
    .await
    .context("hashing task failed")??;
    hashing.finish_and_clear();
    let id = job.manifest.file_id.clone();

    let outcome = match Agent::open(config) {
        Ok(agent) => {
            agent.uploads().submit(&job)?;
            let uploads = agent.uploads().clone();
            let (stop, stopped) = watch::channel(false);
            let running = tokio::spawn(agent.run(stopped));
            let bar = ProgressBar::new(job.manifest.size);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(job.manifest.name.clone());
            let mut progress = uploads.progress();
            let outcome = loop {
                tokio::select! {
                    o = uploads.wait(&id) => break o,
                    changed = progress.changed() => {
                        if changed.is_err() { continue; }
                        let p = progress.borrow().clone();
                        if p.file_id == id {
                            bar.set_position((p.held as u64 * p.chunk_size as u64).min(p.size));
                        }
                    }
                }
            };
            bar.finish_and_clear();
            let _ = stop.send(true);
            match running.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "agent stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "agent task failed"),
                Ok(Ok(())) => {}
            }
            outcome
        }
        Err(AgentError::Locked { .. }) => {
            UploadQueue::submit_to(&UploadQueue::queue_dir(&state_dir), &job)?;
            let waiting = spinner(&format!(
                "{}: handed to the agent running with {}; waiting for the server",
                job.manifest.name,
                state_dir.display()
            ));
            let uploads_dir = state_dir.join("uploads");
            let outcome = loop {
                if let Some(o) = UploadQueue::outcome_on_disk(&uploads_dir, &id) {
                    break o;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            waiting.finish_and_clear();
            outcome
        }
        Err(e) => return Err(e.into()),
    };
    match outcome {
        UploadOutcome::Confirmed { manifest, landed } => {
            println!(
                "uploaded {} ({} bytes, sha256 {}) as file {}",
                manifest.name, manifest.size, manifest.sha256, manifest.file_id
            );
            if landed.is_empty() {
                println!(
                    "the server had it already: delivered by an earlier upload of the same file"
                );
            }
            for place in &landed {
                println!("landed at {place}");
            }
            Ok(ExitCode::SUCCESS)
        }
        UploadOutcome::Failed { manifest, reason } => {
            eprintln!("upload of {} failed: {reason}", manifest.name);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn spinner(message: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    s.set_message(message.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}
