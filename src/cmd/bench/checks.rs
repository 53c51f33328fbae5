//! `fleetbus bench checks`: what running checks costs an agent. A real agent process
//! (the lean `fleetbus-agent` beside this binary, else `fleetbus agent`) runs N checks at
//! an interval against an in-process server; each check's plugin is `sh` appending one
//! byte to a file, so the runs are counted exactly. The agent's own CPU time
//! (`/proc/PID/stat` utime + stime, which leaves out its children: the plugins) per run,
//! and its resident memory, are the figures.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetbus_config::Valid;
use fleetbus_server::Server;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct ChecksFigures {
    /// The agent binary measured.
    pub binary: String,
    /// Plugin runs counted over the measured window.
    pub runs: u64,
    /// The window.
    pub elapsed: Duration,
    /// The agent's own CPU time over the window.
    pub cpu: Duration,
    /// Its resident memory at the end, KiB.
    pub rss_kib: Option<u64>,
    /// Its peak resident memory, KiB.
    pub peak_kib: Option<u64>,
}

/// The agent binary beside this one: the lean `fleetbus-agent` if built, else `fleetbus`
/// (run as `fleetbus agent`).
fn agent_command() -> anyhow::Result<(PathBuf, Vec<&'static str>)> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("this binary's directory")?;
    let lean = dir.join("fleetbus-agent");
    if lean.exists() {
        return Ok((lean, vec![]));
    }
    let full = dir.join("fleetbus");
    if full.exists() {
        return Ok((full, vec!["agent"]));
    }
    anyhow::bail!(
        "neither fleetbus-agent nor fleetbus beside {}: build them (cargo build --release --workspace)",
        exe.display()
    )
}

/// The agent's utime + stime (`/proc/PID/stat` fields 14 and 15), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after the command: state is field 3, so utime (14) is index 11
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(100)
}

fn runs_in(file: &Path) -> u64 {
    std::fs::metadata(file).map(|m| m.len()).unwrap_or(0)
}

/// Runs `checks` checks every `interval` in an agent process for a warm-up of one
/// interval, then measures over `duration`.
pub async fn run(
    checks: usize,
    interval: Duration,
    duration: Duration,
) -> anyhow::Result<ChecksFigures> {
    let tmp = tempfile::Builder::new()
        .prefix("fleetbus-bench-")
        .tempdir()?;
    let (config, port) = super::fleetbus::server_config(tmp.path())?;
    let server = Server::start(&Valid::new(config)?).await?;

    let counter = tmp.path().join("runs");
    let mut text = format!(
        "server = \"mqtt://127.0.0.1:{port}\"\nstate_dir = \"{}\"\nid = \"bench-checks\"\n\
         [metrics]\nenabled = false\n[check_runner]\nconcurrency = 8\n",
        tmp.path().join("state").display()
    );
    for n in 0..checks {
        text.push_str(&format!(
            "[checks.c{n}]\ncommand = [\"/bin/sh\", \"-c\", \"printf . >> {}; echo 'OK - fine | v={n};80;90;0;100'\"]\ninterval = \"{}\"\n",
            counter.display(),
            humantime::format_duration(interval)
        ));
    }
    let config_path = tmp.path().join("agent.toml");
    std::fs::write(&config_path, text)?;
    let (binary, prefix) = agent_command()?;
    let mut child = std::process::Command::new(&binary)
        .args(&prefix)
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    // warm-up: every check has run once (its phase is within the interval)
    tokio::time::sleep(interval + Duration::from_secs(1)).await;
    let (cpu0, runs0, t0) = (cpu_ticks(pid), runs_in(&counter), Instant::now());
    tokio::time::sleep(duration).await;
    let (cpu1, runs1, elapsed) = (cpu_ticks(pid), runs_in(&counter), t0.elapsed());
    let rss_kib = super::upload::resident_kib(pid);
    let peak_kib = super::upload::peak_kib(pid);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    server.shutdown(Duration::from_secs(10)).await;
    let ticks = cpu1
        .zip(cpu0)
        .map(|(a, b)| a.saturating_sub(b))
        .context("reading the agent's CPU time")?;
    Ok(ChecksFigures {
        binary: binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        runs: runs1.saturating_sub(runs0),
        elapsed,
        cpu: Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64),
        rss_kib,
        peak_kib,
    })
}
