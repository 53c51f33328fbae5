//! Running one program: no shell, its own process group, every process it started ended
//! with it ([`super::contain`]), stdout and stderr captured up to a limit each. Past its
//! timeout the group and every marked process get SIGTERM, then `grace` to stop, then
//! SIGKILL; the program is reaped only after that, so its process group id cannot be
//! reused while it is being signalled.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt};

/// What to run and how.
#[derive(Debug, Clone)]
pub(crate) struct Spec<'a> {
    /// The program and its arguments.
    pub argv: &'a [String],
    /// How long it may run.
    pub timeout: Duration,
    /// How long its processes get between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// The most bytes of stdout, and of stderr, kept.
    pub limit: usize,
    /// The run's marker ([`super::contain::marker`]).
    pub marker: &'a str,
}

/// How a run went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finished {
    /// How it ended.
    pub end: End,
    /// Its standard output.
    pub stdout: Captured,
    /// Its standard error.
    pub stderr: Captured,
    /// How many processes it left running that were ended with it (0 after a timeout,
    /// where all of them were).
    pub left_behind: usize,
    /// How long it ran.
    pub elapsed: Duration,
}

/// How a program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it.
    Signalled(i32),
    /// It ran past its timeout and was ended (SIGTERM, then SIGKILL after the grace).
    TimedOut,
    /// It could not be started, or not waited for.
    NotStarted(String),
}

/// One pipe's output: the first bytes, and how many more were cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Captured {
    /// The bytes kept.
    pub kept: Vec<u8>,
    /// How many bytes past the limit were dropped.
    pub cut: u64,
}

/// What stands for the output when a process the run started kept its pipes open.
const UNCOLLECTED: &str = "[output not collected: a process the run started kept its pipes open]";

/// Runs `spec` (see the module documentation).
pub(crate) async fn run(spec: &Spec<'_>) -> Finished {
    let started = Instant::now();
    let not_started = |why: String| Finished {
        end: End::NotStarted(why),
        stdout: Captured::default(),
        stderr: Captured::default(),
        left_behind: 0,
        elapsed: started.elapsed(),
    };
    let Some((program, args)) = spec.argv.split_first() else {
        return not_started("empty command".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env(super::contain::MARKER_VAR, spec.marker)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return not_started(format!("cannot start `{program}`: {e}")),
    };
    let group = child.id();
    let out = tokio::spawn(read_bounded(child.stdout.take(), spec.limit));
    let err = tokio::spawn(read_bounded(child.stderr.take(), spec.limit));
    let waited = tokio::time::timeout(spec.timeout, child.wait()).await;
    let elapsed = started.elapsed();
    let (end, left_behind) = match waited {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            let end = match (status.code(), status.signal()) {
                (Some(code), _) => End::Exited(code),
                (None, Some(signal)) => End::Signalled(signal),
                (None, None) => End::NotStarted(format!("`{program}` ended without a status")),
            };
            // it may have left children running (holding its pipes)
            (end, super::contain::end_all(spec.marker, spec.grace).await)
        }
        Ok(Err(e)) => {
            let left = super::contain::end_all(spec.marker, spec.grace).await;
            (
                End::NotStarted(format!("waiting for `{program}`: {e}")),
                left,
            )
        }
        Err(_) => {
            stop(group, spec.marker, spec.grace).await;
            // reaped only now: the group id stayed ours while it was signalled
            let _ = child.wait().await;
            (End::TimedOut, 0)
        }
    };
    // the pipes close once every process of the run is gone
    let collect = async { (out.await.unwrap_or_default(), err.await.unwrap_or_default()) };
    let (stdout, stderr) = match tokio::time::timeout(Duration::from_secs(2), collect).await {
        Ok(both) => both,
        Err(_) => (
            Captured::default(),
            Captured {
                kept: UNCOLLECTED.as_bytes().to_vec(),
                cut: 0,
            },
        ),
    };
    Finished {
        end,
        stdout,
        stderr,
        left_behind,
        elapsed,
    }
}

/// Ends a run past its timeout: SIGTERM to its process group and to every process carrying
/// its marker, up to `grace` for them to go, then SIGKILL to whatever is left.
async fn stop(group: Option<u32>, marker: &str, grace: Duration) {
    signal_group(group, Signal::SIGTERM);
    super::contain::signal_all(marker, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !super::contain::marked(marker).is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_group(group, Signal::SIGKILL);
    super::contain::signal_all(marker, Signal::SIGKILL);
}

/// Sends `signal` to the process group `pgid` leads (gone already: nothing to do).
fn signal_group(pgid: Option<u32>, signal: Signal) {
    let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(pgid, %signal, error = %e, "cannot signal a timed-out run's process group")
        }
    }
}

/// Reads a pipe to its end, keeping the first `limit` bytes and counting the rest.
async fn read_bounded<R: AsyncRead + Unpin>(pipe: Option<R>, limit: usize) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(captured.kept.len());
                captured.kept.extend_from_slice(&buf[..n.min(room)]);
                captured.cut += n.saturating_sub(room) as u64;
            }
        }
    }
    captured
}

impl Captured {
    /// The kept bytes as text (invalid UTF-8 replaced), with a note of what was cut.
    pub fn text(&self, pipe: &str) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.cut > 0 {
            text.push_str(&format!("\n[... {} more bytes of {pipe} cut]", self.cut));
        }
        text
    }
}

impl Finished {
    /// stdout, then stderr under a `[stderr]` line, each with a note of what was cut.
    pub fn combined_output(&self) -> String {
        let mut text = self.stdout.text("stdout");
        if !self.stderr.kept.is_empty() {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str("[stderr]\n");
            text.push_str(&self.stderr.text("stderr"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    async fn run_for(argv: &[String], timeout: Duration, limit: usize, marker: &str) -> Finished {
        run(&Spec {
            argv,
            timeout,
            grace: Duration::from_millis(500),
            limit,
            marker,
        })
        .await
    }

    /// Waits until process `pid` is gone (a zombie waiting for its reaper counts as gone);
    /// false if it is still running after 5 s.
    async fn gone(pid: i32) -> bool {
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !alive()
    }

    fn pid_in(path: &std::path::Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn exit_codes_and_both_outputs_are_reported() {
        let done = run_for(
            &argv(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
            Duration::from_secs(5),
            100,
            "test",
        )
        .await;
        assert_eq!(done.end, End::Exited(3));
        assert_eq!(done.stdout.kept, b"hi\n");
        assert_eq!(done.stderr.kept, b"oops\n");
        assert_eq!(done.combined_output(), "hi\n\n[stderr]\noops\n");
        let killed = run_for(
            &argv(&["sh", "-c", "kill -9 $$"]),
            Duration::from_secs(5),
            10,
            "t",
        )
        .await;
        assert_eq!(killed.end, End::Signalled(9));
    }

    #[tokio::test]
    async fn output_beyond_the_limit_is_cut_with_a_marker() {
        let done = run_for(
            &argv(&["sh", "-c", "yes | head -c 10000"]),
            Duration::from_secs(5),
            100,
            "test",
        )
        .await;
        let output = done.combined_output();
        assert!(output.starts_with("y\ny\n"));
        assert!(
            output.contains("[... 9900 more bytes of stdout cut]"),
            "{output}"
        );
    }

    #[tokio::test]
    async fn a_timeout_ends_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let done = run_for(
            &argv(&["sh", "-c", &script]),
            Duration::from_millis(300),
            100,
            "test-timeout",
        )
        .await;
        assert_eq!(done.end, End::TimedOut);
        assert!(
            gone(pid_in(&pidfile)).await,
            "the grandchild survived the timeout"
        );
    }

    /// The case: a plugin forks a child that ignores SIGTERM, and hangs. SIGTERM
    /// ends the plugin, the grace runs out, SIGKILL ends the child; nothing is left, and
    /// the plugin itself was reaped (no zombie of ours).
    #[tokio::test]
    async fn a_child_ignoring_sigterm_is_killed_after_the_grace_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("stubborn.pid");
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 0.05; done' & sleep 30",
            pidfile.display()
        );
        let started = Instant::now();
        let done = run_for(
            &argv(&["sh", "-c", &script]),
            Duration::from_millis(400),
            100,
            "test-stubborn",
        )
        .await;
        assert_eq!(done.end, End::TimedOut);
        // it took the grace: the child did not go on SIGTERM
        assert!(
            started.elapsed() >= Duration::from_millis(850),
            "{:?}",
            started.elapsed()
        );
        assert!(
            gone(pid_in(&pidfile)).await,
            "the SIGTERM-ignoring child survived"
        );
        assert!(super::super::contain::marked("test-stubborn").is_empty());
    }

    /// A plugin that stops on SIGTERM is not waited on for the whole grace.
    #[tokio::test]
    async fn a_program_that_stops_on_sigterm_ends_before_the_grace() {
        let started = Instant::now();
        let done = run(&Spec {
            argv: &argv(&["sleep", "30"]),
            timeout: Duration::from_millis(200),
            grace: Duration::from_secs(10),
            limit: 10,
            marker: "test-polite",
        })
        .await;
        assert_eq!(done.end, End::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// A child that left the run's process group with `setsid` used to survive the
    /// timeout kill.
    #[tokio::test]
    async fn a_timeout_also_ends_a_child_that_left_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & sleep 30",
            pidfile.display()
        );
        let done = run_for(
            &argv(&["sh", "-c", &script]),
            Duration::from_millis(500),
            100,
            "test-setsid",
        )
        .await;
        assert_eq!(done.end, End::TimedOut);
        assert!(gone(pid_in(&pidfile)).await, "the setsid child survived");
    }

    /// A program that exits 0 leaving a child running: the child is ended with the run,
    /// and the run's output is collected (the child held the pipes open before).
    #[tokio::test]
    async fn a_child_left_behind_by_a_finished_program_ends_with_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("left.pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & sleep 0.3; echo done",
            pidfile.display()
        );
        let done = run_for(
            &argv(&["sh", "-c", &script]),
            Duration::from_secs(10),
            1000,
            "test-left",
        )
        .await;
        assert_eq!(done.end, End::Exited(0));
        assert_eq!(done.stdout.kept, b"done\n");
        assert_eq!(done.left_behind, 1);
        assert!(
            gone(pid_in(&pidfile)).await,
            "the left-behind child survived"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let done = run_for(
            &argv(&["/nonexistent/prog"]),
            Duration::from_secs(1),
            10,
            "test",
        )
        .await;
        assert!(
            matches!(done.end, End::NotStarted(ref r) if r.contains("/nonexistent/prog")),
            "{done:?}"
        );
    }
}
