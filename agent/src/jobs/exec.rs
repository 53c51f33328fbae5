//! Running one job's process: no shell, its own process group (killed whole on timeout),
//! stdout and stderr captured up to a limit.

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

/// Runs `argv` with `timeout`, keeping at most `limit` bytes of stdout and of stderr.
pub(crate) async fn run(argv: &[String], timeout: Duration, limit: usize) -> Ended {
    let Some((program, args)) = argv.split_first() else {
        return Ended::NotStarted("empty command".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    if timed_out {
        if let Some(pid) = group {
            kill_group(pid);
        }
        let _ = child.wait().await;
    }
    // the pipes close once every process of the group is gone
    let collect = async {
        let out = out.await.unwrap_or_default();
        let err = err.await.unwrap_or_default();
        combine(out, err)
    };
    let output = match tokio::time::timeout(Duration::from_secs(2), collect).await {
        Ok(o) => o,
        Err(_) => "[output not collected: a process the job started kept its pipes open]".into(),
    };
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

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let ended = run(&argv(&["/nonexistent/prog"]), Duration::from_secs(1), 10).await;
        assert!(
            matches!(ended, Ended::NotStarted(ref r) if r.contains("/nonexistent/prog")),
            "{ended:?}"
        );
    }
}
