//! Running one job's process: no shell, its own process group (killed whole on timeout),
//! every process it started ended with it ([`super::contain`]), stdout and stderr captured
//! up to a limit.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It exited (`None`: killed by a signal).
    Exited { code: Option<i32>, output: String },
    /// It ran past its timeout; its whole process group was killed.
    TimedOut { output: String },
    /// It could not be started.
    NotStarted(String),
}

/// How long processes a job left behind get to stop after SIGTERM before SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// Runs `argv` with `timeout`, keeping at most `limit` bytes of stdout and of stderr. Its
/// processes carry `marker` ([`super::contain`]): whatever is still running when it ends
/// (it exited, or ran past `timeout`) is ended too.
pub(crate) async fn run(argv: &[String], timeout: Duration, limit: usize, marker: &str) -> Ended {
    let Some((program, args)) = argv.split_first() else {
        return Ended::NotStarted("empty command".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env(super::contain::MARKER_VAR, marker)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return Ended::NotStarted(format!("cannot start `{program}`: {e}")),
    };
    let group = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out = tokio::spawn(read_bounded(stdout, limit));
    let err = tokio::spawn(read_bounded(stderr, limit));
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let timed_out = waited.is_err();
    let left_behind = if timed_out {
        if let Some(pid) = group {
            kill_group(pid);
        }
        let _ = child.wait().await;
        // and the ones that left the group (setsid)
        super::contain::kill_all(marker)
    } else {
        // a handler that exited may have left children running (holding its pipes)
        super::contain::end_all(marker, LEFTOVER_GRACE).await
    };
    // the pipes close once every process of the group is gone
    let collect = async {
        let out = out.await.unwrap_or_default();
        let err = err.await.unwrap_or_default();
        combine(out, err)
    };
    let mut output = match tokio::time::timeout(Duration::from_secs(2), collect).await {
        Ok(o) => o,
        Err(_) => "[output not collected: a process the job started kept its pipes open]".into(),
    };
    if left_behind > 0 && !timed_out {
        output.push_str(&format!(
            "\n[{left_behind} process(es) the job left running were ended]"
        ));
    }
    match waited {
        Err(_) => Ended::TimedOut { output },
        Ok(Ok(status)) => Ended::Exited {
            code: status.code(),
            output,
        },
        Ok(Err(e)) => Ended::NotStarted(format!("waiting for `{program}`: {e}")),
    }
}

/// Kills every process in the group `pgid` leads.
fn kill_group(pgid: u32) {
    let pid = nix::unistd::Pid::from_raw(pgid as i32);
    if let Err(e) = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(pgid, error = %e, "cannot kill a timed-out job's process group");
    }
}

/// Reads a pipe to its end, keeping the first `limit` bytes and counting the rest.
async fn read_bounded<R: AsyncRead + Unpin>(pipe: Option<R>, limit: usize) -> (Vec<u8>, u64) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), 0);
    };
    let mut kept = Vec::new();
    let mut cut = 0u64;
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                cut += n.saturating_sub(room) as u64;
            }
        }
    }
    (kept, cut)
}

fn combine((out, out_cut): (Vec<u8>, u64), (err, err_cut): (Vec<u8>, u64)) -> String {
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if out_cut > 0 {
        text.push_str(&format!("\n[... {out_cut} more bytes of stdout cut]"));
    }
    if !err.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&String::from_utf8_lossy(&err));
        if err_cut > 0 {
            text.push_str(&format!("\n[... {err_cut} more bytes of stderr cut]"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn exit_codes_and_output_are_reported() {
        let ended = run(
            &argv(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
            Duration::from_secs(5),
            100,
            "test",
        )
        .await;
        assert_eq!(
            ended,
            Ended::Exited {
                code: Some(3),
                output: "hi\n\n[stderr]\noops\n".into()
            }
        );
    }

    #[tokio::test]
    async fn output_beyond_the_limit_is_cut_with_a_marker() {
        let ended = run(
            &argv(&["sh", "-c", "yes | head -c 10000"]),
            Duration::from_secs(5),
            100,
            "test",
        )
        .await;
        let Ended::Exited { output, .. } = ended else {
            panic!("{ended:?}")
        };
        assert!(output.starts_with("y\ny\n"));
        assert!(
            output.contains("[... 9900 more bytes of stdout cut]"),
            "{output}"
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let ended = run(
            &argv(&["sh", "-c", &script]),
            Duration::from_millis(300),
            100,
            "test-timeout",
        )
        .await;
        assert!(matches!(ended, Ended::TimedOut { .. }), "{ended:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // the grandchild is gone too (SIGKILL is delivered asynchronously: allow it a
        // moment; a zombie waiting for init to reap it is gone enough)
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(), "grandchild {pid} survived the timeout");
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

    /// A child that left the job's process group with `setsid` used to survive the
    /// timeout kill.
    #[tokio::test]
    async fn a_timeout_also_ends_a_child_that_left_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & sleep 30",
            pidfile.display()
        );
        let ended = run(
            &argv(&["sh", "-c", &script]),
            Duration::from_millis(500),
            100,
            "test-setsid",
        )
        .await;
        assert!(matches!(ended, Ended::TimedOut { .. }), "{ended:?}");
        assert!(gone(pid_in(&pidfile)).await, "the setsid child survived");
    }

    /// A handler that exits 0 leaving a child running: the child is ended with the job,
    /// and the job's output is collected (the child held the pipes open before).
    #[tokio::test]
    async fn a_child_left_behind_by_a_finished_handler_ends_with_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("left.pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & sleep 0.3; echo done",
            pidfile.display()
        );
        let ended = run(
            &argv(&["sh", "-c", &script]),
            Duration::from_secs(10),
            1000,
            "test-left",
        )
        .await;
        let Ended::Exited {
            code: Some(0),
            output,
        } = ended
        else {
            panic!("{ended:?}")
        };
        assert!(output.starts_with("done\n"), "{output}");
        assert!(
            output.contains("1 process(es) the job left running were ended"),
            "{output}"
        );
        assert!(
            gone(pid_in(&pidfile)).await,
            "the left-behind child survived"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let ended = run(
            &argv(&["/nonexistent/prog"]),
            Duration::from_secs(1),
            10,
            "test",
        )
        .await;
        assert!(
            matches!(ended, Ended::NotStarted(ref r) if r.contains("/nonexistent/prog")),
            "{ended:?}"
        );
    }
}
