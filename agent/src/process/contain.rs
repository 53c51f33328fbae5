//! Every process a run (a job, a check) starts ends with the run.
//!
//! A run's processes get its own process group, but a child that calls `setsid` leaves it,
//! and a program that exits 0 may leave children running (holding its output pipes, so
//! their output was lost too). Each run's processes carry a marker in their environment
//! (`FLEETBUS_JOB=...`, inherited by every descendant, `setsid` or not); when the run ends,
//! every process still carrying its marker is asked to stop (SIGTERM), given a grace
//! period, then killed (SIGKILL). A process that clears its own environment is not found
//! this way (a cgroup per run would be).

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The environment variable that marks a run's processes.
pub(crate) const MARKER_VAR: &str = "FLEETBUS_JOB";

/// A marker no other run shares (the job id or check name, and a random part).
pub(crate) fn marker(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

/// Processes (not zombies) whose environment carries `MARKER_VAR=marker`.
pub(crate) fn marked(marker: &str) -> Vec<Pid> {
    let needle = format!("{MARKER_VAR}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue; // gone, or not ours to read
        };
        let carries = environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes());
        if carries && !is_zombie(pid) {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(true)
}

/// Ends every process carrying `marker`: SIGTERM, up to `grace` for them to go, then
/// SIGKILL. Returns how many there were.
pub(crate) async fn end_all(marker: &str, grace: Duration) -> usize {
    let left = marked(marker);
    if left.is_empty() {
        return 0;
    }
    for &pid in &left {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !marked(marker).is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for pid in marked(marker) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    left.len()
}

/// Sends `signal` to every process carrying `marker`; how many there were.
pub(crate) fn signal_all(marker: &str, signal: Signal) -> usize {
    let left = marked(marker);
    for &pid in &left {
        let _ = kill(pid, signal);
    }
    left.len()
}
