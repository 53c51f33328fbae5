//! The check runner: runs each `[checks.NAME]` at its phase ([`super::schedule`]), at most
//! `check_runner.concurrency` plugins at a time, each in its own process group
//! (`crate::process`); tracks each check's state ([`super::tracker`]) and pushes to the
//! outbox a record on stream `checks` for every result, and one on stream `events` for
//! every HARD state change, recovery and flapping start or stop.
//!
//! What the tracker must keep across restarts is saved in `state_dir/checks.json` after
//! the records it concerns are in the outbox: a crash in between raises an event again
//! (an event console folds it), never loses one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fleetbus_protocol::check::{CheckResult, CheckState, StateType};
use fleetbus_protocol::{Event, Record};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use super::builtin::Builtin;
use super::config::{CheckConfig, CheckRunnerConfig};
use super::outcome::Outcome;
use super::schedule;
use super::tracker::{Announce, Observed, Persisted, Tracker};
use crate::outbox::Outbox;
use crate::process::{contain, exec};
use crate::state_file::write_json;
use crate::AgentError;

/// The stream every check result is pushed on.
pub const CHECKS_STREAM: &str = "checks";
/// The stream a check's events are pushed on.
pub const EVENTS_STREAM: &str = "events";
/// The event class of a check's HARD state change or recovery.
pub const STATE_CLASS: &str = "check.state";
/// The event class of a check's flapping start and stop.
pub const FLAPPING_CLASS: &str = "check.flapping";

/// Runs the configured checks; cheap to clone.
#[derive(Clone)]
pub struct CheckRunner {
    inner: Arc<Inner>,
}

struct Inner {
    agent: String,
    state_dir: PathBuf,
    checks: BTreeMap<String, CheckConfig>,
    config: CheckRunnerConfig,
    state_path: PathBuf,
    trackers: Mutex<BTreeMap<String, Tracker>>,
    /// When each check last had a result (a passive check's freshness).
    heard: Mutex<BTreeMap<String, Instant>>,
    slots: Semaphore,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    runs: AtomicU64,
    skipped: AtomicU64,
    timed_out: AtomicU64,
    events: AtomicU64,
    unstored: AtomicU64,
    submitted: AtomicU64,
    rejected: AtomicU64,
}

/// The runner's counters since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    /// Results recorded (plugin runs).
    pub runs: u64,
    /// Runs not made because the check's previous run, or a wait for a free slot, took
    /// their turn (never stacked).
    pub skipped: u64,
    /// Runs that ran past their timeout.
    pub timed_out: u64,
    /// Events raised.
    pub events: u64,
    /// Records the outbox refused (disk full): logged, and counted here.
    pub unstored: u64,
    /// Submitted results taken in.
    pub submitted: u64,
    /// Submissions refused (unreadable, or for a check not configured): logged, and the
    /// file renamed to `*.rejected`.
    pub rejected: u64,
}

impl CheckRunner {
    /// The runner of `checks` for agent `agent`, resuming the states saved in `state_dir`.
    pub fn open(
        agent: &str,
        checks: &BTreeMap<String, CheckConfig>,
        config: &CheckRunnerConfig,
        state_dir: &std::path::Path,
    ) -> Result<CheckRunner, AgentError> {
        let state_path = state_dir.join("checks.json");
        let mut saved: BTreeMap<String, Persisted> = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
                path: state_path.clone(),
                problem: format!("{e} (delete the file to start every check's state afresh)"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(AgentError::Io {
                    path: state_path,
                    op: "read",
                    source,
                })
            }
        };
        let trackers = checks
            .keys()
            .map(|name| {
                let kept = saved.remove(name).unwrap_or_default();
                (name.clone(), Tracker::resume(kept))
            })
            .collect();
        Ok(CheckRunner {
            inner: Arc::new(Inner {
                agent: agent.to_string(),
                state_dir: state_dir.to_path_buf(),
                checks: checks.clone(),
                config: config.clone(),
                state_path,
                trackers: Mutex::new(trackers),
                heard: Mutex::new(BTreeMap::new()),
                slots: Semaphore::new(config.concurrency.max(1)),
                counters: Counters::default(),
            }),
        })
    }

    /// The counters since the agent started.
    pub fn counts(&self) -> CheckCounts {
        let c = &self.inner.counters;
        CheckCounts {
            runs: c.runs.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            timed_out: c.timed_out.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            unstored: c.unstored.load(Ordering::Relaxed),
            submitted: c.submitted.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
        }
    }

    /// Runs every check, takes submitted results in and turns silent passive checks
    /// UNKNOWN, until `shutdown` turns true.
    pub async fn run(self, outbox: Arc<Outbox>, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for (name, config) in &self.inner.checks {
            let span = tracing::info_span!("check", check = %name);
            let this = self.clone();
            let (name, config, outbox, shutdown) = (
                name.clone(),
                config.clone(),
                outbox.clone(),
                shutdown.clone(),
            );
            if !config.is_passive() {
                tasks.spawn(
                    this.run_check(name, config, outbox, shutdown)
                        .instrument(span),
                );
            } else if let Some(freshness) = config.freshness {
                tasks.spawn(
                    this.watch_freshness(name, config, freshness, outbox, shutdown)
                        .instrument(span),
                );
            }
        }
        tasks.spawn(
            self.clone()
                .take_submissions(outbox.clone(), shutdown.clone())
                .in_current_span(),
        );
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "check task failed");
            }
        }
    }

    /// One check's loop: wait for its turn, take a slot, run, conclude, schedule the next.
    async fn run_check(
        self,
        name: String,
        config: CheckConfig,
        outbox: Arc<Outbox>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let phase = schedule::phase(&self.inner.agent, &name, config.interval);
        let start = Instant::now() + schedule::until_due(SystemTime::now(), config.interval, phase);
        // the runs on the grid are `start + k * interval`; `turn` is the next k
        let mut turn: u64 = 0;
        let mut due = start;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
            let permit = tokio::select! {
                permit = self.inner.slots.acquire() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = crate::stopped(&mut shutdown) => return,
            };
            let Some((outcome, timed_out)) = self.run_once(&name, &config, &mut shutdown).await
            else {
                return;
            };
            drop(permit);
            if timed_out {
                self.inner
                    .counters
                    .timed_out
                    .fetch_add(1, Ordering::Relaxed);
            }
            let observed = self.conclude(&outbox, &name, &config, outcome);
            // the next turn on the grid after now; the turns passed meanwhile are skipped
            let now = Instant::now();
            let interval = config.interval.as_nanos().max(1);
            let passed = now.saturating_duration_since(start).as_nanos() / interval;
            let next_turn = u64::try_from(passed + 1).unwrap_or(u64::MAX);
            let skipped = next_turn.saturating_sub(turn + 1);
            if skipped > 0 {
                self.inner
                    .counters
                    .skipped
                    .fetch_add(skipped, Ordering::Relaxed);
                tracing::warn!(
                    skipped,
                    "check runs skipped: the previous run, or the wait for a free slot, took their turn"
                );
            }
            turn = next_turn;
            let on_grid = start
                + config
                    .interval
                    .saturating_mul(u32::try_from(turn).unwrap_or(u32::MAX));
            due = match (observed.state_type, config.retry_interval) {
                // confirming a problem: retry sooner (never later than the grid)
                (StateType::Soft, Some(retry)) => (now + retry).min(on_grid),
                _ => on_grid,
            };
        }
    }

    /// Runs a check once (its plugin or its built-in): the outcome and whether it timed
    /// out; `None` when the agent stopped meanwhile (a plugin's processes are then ended).
    async fn run_once(
        &self,
        name: &str,
        config: &CheckConfig,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(Outcome, bool)> {
        if let Some(builtin) = Builtin::of(config) {
            return tokio::select! {
                done = super::builtin::run(builtin, config) => Some(done),
                _ = crate::stopped(shutdown) => None,
            };
        }
        let marker = contain::marker(name);
        let spec = exec::Spec {
            argv: &config.command,
            timeout: config.timeout,
            grace: self.inner.config.kill_grace,
            limit: config.output_limit,
            marker: &marker,
        };
        let done = tokio::select! {
            done = exec::run(&spec) => done,
            _ = crate::stopped(shutdown) => {
                // the run is dropped (its program killed): end what it started too
                contain::signal_all(&marker, nix::sys::signal::Signal::SIGKILL);
                return None;
            }
        };
        let outcome = Outcome::of_run(&done, config.timeout, self.inner.config.kill_grace);
        Some((outcome, done.end == exec::End::TimedOut))
    }

    /// A passive check's freshness: silence for `freshness` gives an UNKNOWN result, and
    /// so does each further period of silence.
    async fn watch_freshness(
        self,
        name: String,
        config: CheckConfig,
        freshness: std::time::Duration,
        outbox: Arc<Outbox>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut deadline = Instant::now() + freshness;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
            let heard = lock(&self.inner.heard).get(&name).copied();
            match heard {
                Some(at) if at + freshness > Instant::now() => deadline = at + freshness,
                _ => {
                    tracing::warn!(?freshness, "passive check heard nothing: UNKNOWN");
                    self.conclude(&outbox, &name, &config, Outcome::stale(freshness));
                    deadline = Instant::now() + freshness;
                }
            }
        }
    }

    /// Takes submitted results in ([`super::passive`]), every `submit_poll`.
    async fn take_submissions(self, outbox: Arc<Outbox>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.inner.config.submit_poll) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
            let state_dir = self.inner.state_dir.clone();
            let waiting = tokio::task::spawn_blocking(move || super::passive::waiting(&state_dir))
                .await
                .unwrap_or_default();
            if waiting.is_empty() {
                continue;
            }
            let mut taken = Vec::new();
            for (path, submission) in waiting {
                let refused = match submission {
                    Err(why) => why,
                    Ok(s) => match self.inner.checks.get(&s.check) {
                        Some(config) => {
                            let span = tracing::info_span!("check", check = %s.check);
                            let _entered = span.enter();
                            let outcome = Outcome::of_submission(&s, config.output_limit);
                            self.conclude(&outbox, &s.check, config, outcome);
                            self.inner
                                .counters
                                .submitted
                                .fetch_add(1, Ordering::Relaxed);
                            taken.push(path);
                            continue;
                        }
                        None => format!("no check `{}` is configured", s.check),
                    },
                };
                self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                let aside = path.with_extension("rejected");
                tracing::error!(file = %path.display(), kept_as = %aside.display(), why = %refused, "submitted check result refused");
                if let Err(e) = fleetbus_support::durable::rename(&path, &aside) {
                    tracing::error!(file = %path.display(), error = %e, "cannot set a refused submission aside; removing it");
                    let _ = std::fs::remove_file(&path);
                }
            }
            // the files go only once their records are on disk
            let durable = outbox.clone();
            match tokio::task::spawn_blocking(move || durable.commit()).await {
                Ok(Ok(_)) => {
                    for path in taken {
                        if let Err(e) = std::fs::remove_file(&path) {
                            tracing::error!(file = %path.display(), error = %e, "cannot remove a submission taken in (it will be taken again)");
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "outbox not forced to disk: submissions kept to be taken again")
                }
                Err(e) => {
                    tracing::error!(error = %e, "outbox commit failed: submissions kept to be taken again")
                }
            }
        }
    }

    /// Takes one result in: tracks it, pushes its record (and any events) to the outbox,
    /// then saves the tracker's state if it changed.
    fn conclude(
        &self,
        outbox: &Outbox,
        name: &str,
        config: &CheckConfig,
        outcome: Outcome,
    ) -> Observed {
        let policy = config.policy();
        lock(&self.inner.heard).insert(name.to_string(), Instant::now());
        let mut trackers = lock(&self.inner.trackers);
        let tracker = trackers.entry(name.to_string()).or_default();
        let observed = tracker.observe(outcome.state, &policy);
        self.inner.counters.runs.fetch_add(1, Ordering::Relaxed);
        let result = CheckResult {
            name: name.to_string(),
            status: outcome.state,
            state_type: observed.state_type,
            attempt: observed.attempt,
            max_attempts: policy.max_attempts,
            output: outcome.output.clone(),
            long_output: outcome.long_output.clone(),
            reason: outcome.reason.clone(),
            stderr: outcome.stderr.clone(),
            duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
            passive: outcome.passive,
            flapping: observed.flapping,
            state_change: (observed.state_change * 10.0).round() / 10.0,
            previous: None,
        };
        tracing::debug!(state = %outcome.state, state_type = ?observed.state_type, attempt = observed.attempt, "check result");
        let metrics = outcome.metrics(name);
        let stored = outbox.push(CHECKS_STREAM, |r: &mut Record| {
            if let Some(at) = outcome.at {
                r.ts = at;
            }
            r.check = Some(result.clone());
            r.metrics = metrics;
        });
        let mut all_stored = self.stored(stored, CHECKS_STREAM);
        for announce in &observed.events {
            let (event, previous) = event_of(name, config, &result, *announce);
            tracing::info!(class = %event.class, severity = event.severity.level(), clear = event.clear, text = %event.text, "check event");
            self.inner.counters.events.fetch_add(1, Ordering::Relaxed);
            let stored = outbox.push(EVENTS_STREAM, |r: &mut Record| {
                if let Some(at) = outcome.at {
                    r.ts = at;
                }
                r.event = Some(event);
                r.check = Some(CheckResult {
                    previous,
                    ..result.clone()
                });
            });
            all_stored &= self.stored(stored, EVENTS_STREAM);
        }
        if observed.changed && all_stored {
            let kept: BTreeMap<&String, &Persisted> =
                trackers.iter().map(|(n, t)| (n, t.persisted())).collect();
            if let Err(e) = write_json(&self.inner.state_path, &kept) {
                tracing::error!(error = %e, "cannot save the checks' states (a restart may raise an event again)");
            }
        }
        observed
    }

    /// Whether a push succeeded (an error is logged and counted).
    fn stored(&self, pushed: Result<u64, AgentError>, stream: &str) -> bool {
        match pushed {
            Ok(_) => true,
            Err(e) => {
                self.inner.counters.unstored.fetch_add(1, Ordering::Relaxed);
                tracing::error!(stream, error = %e, "check record not stored");
                false
            }
        }
    }
}

/// Locks `m`, also after a panic elsewhere held it (the maps stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The event an announcement raises, and the state it reports leaving.
fn event_of(
    name: &str,
    config: &CheckConfig,
    result: &CheckResult,
    announce: Announce,
) -> (Event, Option<CheckState>) {
    let (class, severity, text, clear, previous) = match announce {
        Announce::State { from, to } => {
            let text = if result.output.is_empty() {
                format!("{name}: {to}")
            } else {
                format!("{name}: {to}: {}", result.output)
            };
            let text = match &result.reason {
                Some(why) => format!("{text} ({why})"),
                None => text,
            };
            (STATE_CLASS, to.severity(), text, to == CheckState::Ok, Some(from))
        }
        Announce::FlappingStarted => (
            FLAPPING_CLASS,
            fleetbus_protocol::Severity::NOTICE,
            format!(
                "{name} is flapping: {:.1}% state change over the last {} results; its state changes raise no events until it stops",
                result.state_change,
                super::tracker::FLAP_WINDOW
            ),
            false,
            None,
        ),
        Announce::FlappingStopped => (
            FLAPPING_CLASS,
            fleetbus_protocol::Severity::INFO,
            format!(
                "{name} stopped flapping ({:.1}% state change); it is {}",
                result.state_change, result.status
            ),
            true,
            None,
        ),
    };
    (
        Event {
            class: class.to_string(),
            severity,
            rule: Some(name.to_string()),
            group: config.group.clone(),
            resources: Vec::new(),
            text,
            clear,
        },
        previous,
    )
}

#[cfg(test)]
mod tests;
