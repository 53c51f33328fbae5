//! Reloading the rules of a running engine without losing a message.
//!
//! The caller (the server, on SIGHUP or a changed file) parses, checks and tests the new
//! file first; [`Engine::reload`] then:
//!
//! 1. builds every sink that is new or whose configuration changed (any failure: nothing
//!    changes, the error is kept and counted);
//! 2. swaps the rules in under the ingest lock: every message is routed wholly by the old
//!    rules or wholly by the new ones. Counters, and the state of each `throttle` and
//!    `dedupe` whose rule and configuration are unchanged, carry over by rule name;
//! 3. leaves the workers of unchanged sinks alone (their positions, batches and backlog
//!    counters go on);
//! 4. stops the worker of each changed sink once the batch it is writing is written (one
//!    it is retrying is left to the new one), then starts the new one from the position
//!    the old one saved: what the log routed to the sink before the reload is written by
//!    the new configuration;
//! 5. lets each removed sink deliver what the log routed to it (up to
//!    [`REMOVED_SINK_GRACE`]), then hands what is left to its dead-letter sink (or the
//!    built-in one) with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fleetbus_rules::router::Router;
use fleetbus_rules::RuleSet;
use fleetbus_sinks::{Sink, SinkConfig, BUILTIN_DEAD_LETTERS};
use fleetbus_wal::DeadLetter;

use crate::engine::{worker_setup, Engine, Inner};
use crate::position::PositionFile;
use crate::topology::{same_config, Topology};
use crate::worker::{spawn_sink, DeadLetters, SinkHandle, SinkStats};

/// How long a sink a reload removed may take to deliver what the log routed to it before
/// the rest goes to its dead-letter sink.
pub const REMOVED_SINK_GRACE: Duration = Duration::from_secs(60);

/// How long a changed sink's batch in flight may take before its worker is cut off (as by
/// a crash: the sink's recovery then repeats or undoes that batch).
pub const CHANGED_SINK_HALT: Duration = Duration::from_secs(30);

/// Reloads so far.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// When the last reload took effect.
    pub last_reload: Option<DateTime<Utc>>,
    /// Reloads refused (the old rules stayed).
    pub failures: u64,
    /// Why the last refused reload was refused, and when (cleared by a reload that takes
    /// effect).
    pub last_error: Option<(DateTime<Utc>, String)>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// The generation now in effect.
    pub generation: u64,
    /// Sinks the new rules added.
    pub added: Vec<String>,
    /// Sinks whose configuration changed (their workers restarted).
    pub changed: Vec<String>,
    /// Sinks the new rules dropped (delivering what the log routed to them).
    pub removed: Vec<String>,
    /// Sinks left running as they were.
    pub unchanged: usize,
}

enum Plan {
    Keep,
    Replace(Box<dyn Sink>),
    Add(Box<dyn Sink>),
}

impl Engine {
    /// Records a reload refused before it reached the engine (a file that does not parse,
    /// check or pass its tests): the old rules stay.
    pub fn reload_refused(&self, error: &str) {
        let mut status = self.inner.reloads.lock().unwrap_or_else(|p| p.into_inner());
        status.failures += 1;
        status.last_error = Some((Utc::now(), error.to_string()));
    }

    /// Puts `rules` (parsed, checked and tested by the caller) in effect; see the module
    /// documentation. On an error the old rules stay, and the error is kept
    /// ([`crate::EngineStats::reloads`]).
    pub async fn reload(&self, rules: RuleSet) -> Result<ReloadReport, String> {
        let _one = self.reloading.lock().await;
        match self.switch_to(rules).await {
            Ok(report) => {
                let mut status = self.inner.reloads.lock().unwrap_or_else(|p| p.into_inner());
                status.last_reload = Some(Utc::now());
                status.last_error = None;
                Ok(report)
            }
            Err(e) => {
                self.reload_refused(&e);
                Err(e)
            }
        }
    }

    async fn switch_to(&self, rules: RuleSet) -> Result<ReloadReport, String> {
        let inner = &self.inner;
        let old = inner.topology();
        let state_dir = inner.data_dir.join("wal").join("sinks");
        // 1. build what is new or changed, before anything changes
        let mut plans = Vec::new();
        for (name, config) in &rules.sinks {
            if inner.draining().iter().any(|(n, _)| n == name) {
                return Err(format!(
                    "sink `{name}`: an earlier reload removed it and it is still delivering what the log routed to it; reload again once it is done"
                ));
            }
            let plan = match old.index(name) {
                Some(i) if same_config(&old.sink_configs[i], config) => Plan::Keep,
                found => {
                    let place = fleetbus_sinks::SinkPlace {
                        name,
                        data_dir: &inner.data_dir,
                        state_dir: &state_dir,
                        broker: &inner.publisher,
                    };
                    let sink = config
                        .build(&place)
                        .map_err(|e| format!("sink `{name}`: {e}"))?;
                    match found {
                        Some(_) => Plan::Replace(sink),
                        None => Plan::Add(sink),
                    }
                }
            };
            plans.push((name.clone(), config.clone(), plan));
        }
        // each removed sink, with where its dead letters go
        let removed: Vec<(String, Option<String>)> = old
            .sink_names
            .iter()
            .zip(&old.sink_configs)
            .filter(|(n, _)| !rules.sinks.iter().any(|(m, _)| m == *n))
            .map(|(n, c)| (n.clone(), c.dead_letter.clone()))
            .collect();

        // 2. the switch: a sink keeps its counters (its backlog in the log) by name
        let stats: Vec<Arc<SinkStats>> = plans
            .iter()
            .map(|(name, _, _)| match old.index(name) {
                Some(i) => old.sink_stats[i].clone(),
                None => Arc::new(SinkStats::default()),
            })
            .collect();
        let filters = rules.filters();
        let dead_letters_sink = plans
            .iter()
            .position(|(n, _, _)| n == BUILTIN_DEAD_LETTERS)
            .ok_or("the built-in dead-letter sink is missing")?;
        let next = Topology {
            generation: old.generation + 1,
            router: Router::new(rules.rules),
            filters,
            sink_names: plans.iter().map(|p| p.0.clone()).collect(),
            sink_configs: plans.iter().map(|p| p.1.clone()).collect(),
            sink_limits: plans.iter().map(|p| p.1.buffer.max_bytes).collect(),
            sink_stats: stats.clone(),
            dead_letters_sink,
        };
        let generation = next.generation;
        // the removed sinks' positions keep the log from being truncated below them from
        // before the switch until they are done
        for (name, _) in &removed {
            if let Some(i) = old.index(name) {
                inner
                    .draining()
                    .push((name.clone(), old.sink_stats[i].clone()));
            }
        }
        // where the log ends now: a removed sink has nothing routed to it at or after this
        let until = {
            let _ = inner.switch(next);
            inner.wal.next_index()
        };
        drop(old);

        // 3-5. the workers
        let mut report = ReloadReport {
            generation,
            removed: removed.iter().map(|r| r.0.clone()).collect(),
            ..ReloadReport::default()
        };
        let mut outgoing = Vec::new();
        {
            let mut handles = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
            let mut n = 0;
            while n < handles.len() {
                let name = handles[n].name().to_string();
                let replaced = plans
                    .iter()
                    .any(|(p, _, plan)| *p == name && matches!(plan, Plan::Replace(_)));
                if replaced || removed.iter().any(|r| r.0 == name) {
                    outgoing.push(handles.swap_remove(n));
                } else {
                    n += 1;
                }
            }
        }
        let dead_letters: Arc<dyn DeadLetters> = inner.clone();
        for (handle, config) in outgoing
            .into_iter()
            .map(|h| {
                let config = plans.iter().find(|p| p.0 == h.name()).map(|p| p.1.clone());
                (h, config)
            })
            .collect::<Vec<_>>()
        {
            if config.is_none() {
                // removed (counted among the draining above): deliver in its own time
                let name = handle.name().to_string();
                let dead_letter = removed
                    .iter()
                    .find(|r| r.0 == name)
                    .and_then(|r| r.1.clone());
                tokio::spawn(drain_removed(inner.clone(), handle, dead_letter, until));
                continue;
            }
            let name = handle.name().to_string();
            if !handle.halt(CHANGED_SINK_HALT).await {
                tracing::warn!(sink = %name, "the changed sink's batch in flight did not finish in time: cut off, its recovery repeats or undoes it");
            }
        }
        let mut started = Vec::new();
        for ((name, config, plan), stats) in plans.into_iter().zip(stats) {
            // a new sink that never saved a position has nothing in the log before the
            // switch: it starts there instead of scanning the whole log
            let (sink, fresh_from) = match plan {
                Plan::Keep => {
                    report.unchanged += 1;
                    continue;
                }
                Plan::Replace(sink) => {
                    report.changed.push(name.clone());
                    (sink, None)
                }
                Plan::Add(sink) => {
                    report.added.push(name.clone());
                    (sink, Some(until))
                }
            };
            let handle = start_worker(
                inner,
                &state_dir,
                (name, &config),
                sink,
                stats,
                fresh_from,
                dead_letters.clone(),
            )
            .await;
            started.push(handle);
        }
        self.sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(started);
        tracing::info!(generation, added = ?report.added, changed = ?report.changed, removed = ?report.removed, unchanged = report.unchanged, "rules reloaded");
        Ok(report)
    }
}

/// Recovers `sink` (named and configured by `named`) from its saved position and starts
/// its worker; one that never saved a position starts at `fresh_from` when given.
async fn start_worker(
    inner: &Arc<Inner>,
    state_dir: &std::path::Path,
    named: (String, &SinkConfig),
    mut sink: Box<dyn Sink>,
    stats: Arc<SinkStats>,
    fresh_from: Option<u64>,
    dead_letters: Arc<dyn DeadLetters>,
) -> SinkHandle {
    let (name, config) = named;
    let position = PositionFile::new(state_dir, &name);
    let saved = match position.load() {
        Ok(saved) => saved,
        Err(e) => {
            tracing::error!(sink = %name, error = %e, "cannot read the sink's saved position: starting as a sink that never saved one");
            0
        }
    };
    let recovered = match sink.recover(saved).await {
        Ok(start) => start,
        Err(e) => {
            tracing::error!(sink = %name, error = %e, "sink recovery failed: starting from its saved position");
            saved
        }
    };
    let start = match (recovered, fresh_from) {
        (0, Some(from)) => from,
        (recovered, _) => recovered,
    }
    .max(inner.wal.first_index())
    .min(inner.wal.next_index());
    let setup = worker_setup(name, config, position, start, stats);
    spawn_sink(
        sink,
        setup,
        inner.wal.clone(),
        inner.tail.clone(),
        dead_letters,
    )
}

/// A removed sink delivers what the log routed to it (entries before `until`), for at
/// most [`REMOVED_SINK_GRACE`]; what is left then goes to `dead_letter` (or the built-in
/// dead-letter sink) with the reason.
async fn drain_removed(
    inner: Arc<Inner>,
    handle: SinkHandle,
    dead_letter: Option<String>,
    until: u64,
) {
    let name = handle.name().to_string();
    let stats = handle.stats().clone();
    let started = Instant::now();
    let position = || stats.position.load(std::sync::atomic::Ordering::Relaxed);
    while position() < until && started.elapsed() < REMOVED_SINK_GRACE {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = handle.halt(CHANGED_SINK_HALT).await;
    let left = position();
    if left < until {
        let target = dead_letter.unwrap_or_else(|| BUILTIN_DEAD_LETTERS.to_string());
        let mut entries = Vec::new();
        let now = Utc::now().timestamp_millis();
        let read = inner.wal.read_all(left, |index, entry, _| {
            if index < until && entry.goes_to(&name) {
                let mut e = entry.clone();
                e.sinks = vec![target.clone()];
                e.key = None;
                e.dead_letter = Some(DeadLetter {
                    sink: name.clone(),
                    error: format!("sink removed by a reload before it delivered this (not delivered within {REMOVED_SINK_GRACE:?})"),
                    attempts: 0,
                    failed_at_ms: now,
                });
                entries.push(e);
            }
        });
        let moved = entries.len();
        let result = read
            .map_err(|e| e.to_string())
            .and_then(|()| DeadLetters::append(&*inner, &target, entries));
        match result {
            Ok(()) => {
                tracing::warn!(sink = %name, moved, to = %target, "a removed sink did not deliver everything routed to it in time: the rest went to the dead-letter sink")
            }
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "a removed sink's undelivered messages could not be moved to the dead-letter sink; they stay in the log until the next start")
            }
        }
    } else {
        tracing::info!(sink = %name, "a removed sink delivered everything routed to it");
    }
    inner.draining().retain(|(n, _)| *n != name);
}
