//! How `fleetbus serve` stops: one stop signal that every input and housekeeping task
//! watches (as in tokio's mini-redis), and a [`Drain`] that waits for each stage in
//! data-flow order within one deadline. Inputs close first; then each stage ends once the
//! stage before it has, so whatever it holds reaches the next one; then the engine's last
//! commit and the sinks. Nothing that holds data is aborted: a stage still running at the
//! deadline is named in the log and left to the process's exit, and what it held is where
//! a restart finds it (the write-ahead log, the spool, agents' outboxes).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Sends the stop signal (once; every [`StopSignal`] sees it).
#[derive(Debug)]
pub(crate) struct Stopper {
    tx: watch::Sender<bool>,
}

/// The receiving end of the stop signal, one clone per task.
#[derive(Debug, Clone)]
pub(crate) struct StopSignal {
    rx: watch::Receiver<bool>,
}

/// A stop signal and its first receiver.
pub(crate) fn stop_signal() -> (Stopper, StopSignal) {
    let (tx, rx) = watch::channel(false);
    (Stopper { tx }, StopSignal { rx })
}

impl Stopper {
    /// Tells every [`StopSignal`] to stop.
    pub(crate) fn stop(&self) {
        self.tx.send_replace(true);
    }
}

impl StopSignal {
    /// Returns once the stop signal was sent (at once if it already was, or if the
    /// [`Stopper`] is gone).
    pub(crate) async fn stopped(&mut self) {
        let _ = self.rx.wait_for(|stopped| *stopped).await;
    }
}

/// Something a stage runs on.
pub(crate) enum Running {
    /// A task on the runtime.
    Task(JoinHandle<()>),
    /// A thread of its own (waited for without blocking the runtime).
    Thread(std::thread::JoinHandle<()>),
}

/// Waits for stages in turn until one deadline, and remembers what did not end in time.
pub(crate) struct Drain {
    started: Instant,
    deadline: Instant,
    late: Vec<String>,
}

impl Drain {
    /// A drain that must be over within `deadline`.
    pub(crate) fn new(deadline: Duration) -> Drain {
        let started = Instant::now();
        Drain {
            started,
            deadline: started + deadline,
            late: Vec::new(),
        }
    }

    /// Time left before the deadline.
    pub(crate) fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Waits for `what` to end, at most until the deadline; past it, `what` is named as
    /// still running and left alone (never aborted). Returns whether it ended.
    pub(crate) async fn wait(&mut self, what: &'static str, running: Running) -> bool {
        let left = self.left();
        let ended = match running {
            Running::Task(task) => tokio::time::timeout(left, task).await.is_ok(),
            Running::Thread(thread) => {
                let joined = tokio::task::spawn_blocking(move || thread.join());
                tokio::time::timeout(left, joined).await.is_ok()
            }
        };
        if !ended {
            tracing::warn!(stage = what, "still running at the shutdown deadline");
            self.late.push(what.to_string());
        }
        ended
    }

    /// Notes that `what` did not end in time (it ran on past the deadline inside a stage
    /// that reports for itself, e.g. a sink).
    pub(crate) fn late(&mut self, what: String) {
        self.late.push(what);
    }

    /// Logs how the stop went: how long it took, and whatever was still running.
    pub(crate) fn finish(self) {
        if self.late.is_empty() {
            tracing::info!(took = ?self.started.elapsed(), "server stopped");
        } else {
            tracing::warn!(
                took = ?self.started.elapsed(),
                still_running = %self.late.join(", "),
                "server stopped at its deadline; what these held stays where a restart finds it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_receiver_sees_one_stop_and_a_late_stage_is_named_not_aborted() {
        let (stopper, signal) = stop_signal();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let mut signal = signal.clone();
            tasks.push(tokio::spawn(async move { signal.stopped().await }));
        }
        stopper.stop();
        let mut drain = Drain::new(Duration::from_secs(5));
        for task in tasks {
            assert!(drain.wait("listener", Running::Task(task)).await);
        }

        let (release, hold) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _ = hold.recv();
        });
        let mut drain = Drain::new(Duration::from_millis(50));
        assert!(!drain.wait("slow stage", Running::Thread(thread)).await);
        assert_eq!(drain.late, ["slow stage"]);
        assert_eq!(drain.left(), Duration::ZERO);
        // not aborted: the stage still runs and ends on its own
        release.send(()).unwrap();
    }
}
