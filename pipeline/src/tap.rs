//! A live view of what the engine does with the messages on some topics (`fleetbus rules
//! tap`, `GET /rules/tap`): per message, what the engine decoded, which rules matched and
//! what each did (turned it away, held it back, failed, or sent it on, with the message it
//! made and the sinks), and what became of it (appended, a duplicate, refused...).
//!
//! Bounded so that a tap never slows ingest: at most [`MAX_TAPS`] at once; each sees at
//! most [`TAP_RATE`] messages a second (a token bucket) through a queue of [`TAP_QUEUE`]
//! that is never waited for. A message past either is counted as skipped and the next one
//! shown says how many were. With no tap open, a message costs one atomic load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use fleetbus_rules::router::{TraceStep, Traced};
use fleetbus_rules::TopicFilter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::topology::Topology;

/// Most taps open at once.
pub const MAX_TAPS: usize = 8;
/// Most messages a second one tap is shown (more are skipped and counted).
pub const TAP_RATE: u32 = 100;
/// Messages waiting for a slow tap reader (more are skipped and counted).
pub const TAP_QUEUE: usize = 256;

/// What one tap is shown of one message.
#[derive(Debug, Clone, Serialize)]
pub struct TapEvent {
    /// The topic.
    pub topic: String,
    /// When the server received it.
    pub received: DateTime<Utc>,
    /// What became of it: `appended`, `duplicate`, `unrouted`, `refused`, `undecodable`.
    pub outcome: &'static str,
    /// The message as decoded (absent when it could not be).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<serde_json::Value>,
    /// What each rule whose topic filters match did.
    pub rules: Vec<RuleEvent>,
    /// Messages on the tap's topics it was not shown since the one before (sampling).
    pub skipped: u64,
}

/// What one rule did with a message, or with one `foreach` element of it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleEvent {
    /// The rule's name.
    pub rule: String,
    /// Under `foreach`, the element's index.
    pub part: u32,
    /// `sent`, `filtered`, `condition-error`, `throttled`, `deduplicated`, `aggregated`
    /// (with the roll-up of a window it closed, if any) or `failed`.
    pub outcome: &'static str,
    /// The error of `condition-error` and `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The message the rule made (absent: the message went on as published).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub made: Option<serde_json::Value>,
    /// The sinks it went to.
    pub sinks: Vec<String>,
}

/// What the engine saw of one message a tap wants.
#[derive(Default)]
pub(crate) struct Seen {
    pub message: Option<serde_json::Value>,
    pub received: Option<DateTime<Utc>>,
    pub trace: Vec<Traced>,
    pub topology: Option<Arc<Topology>>,
}

struct Tap {
    id: u64,
    filter: TopicFilter,
    rule: Option<String>,
    tx: mpsc::Sender<TapEvent>,
    tokens: f64,
    refilled: Instant,
    skipped: u64,
}

/// The open taps.
#[derive(Default)]
pub struct Taps {
    open: AtomicUsize,
    taps: Mutex<(u64, Vec<Tap>)>,
}

/// One open tap: its events, until dropped.
pub struct TapHandle {
    id: u64,
    taps: Arc<Taps>,
    /// The events.
    pub events: mpsc::Receiver<TapEvent>,
}

impl Drop for TapHandle {
    fn drop(&mut self) {
        let mut taps = self.taps.lock();
        taps.1.retain(|t| t.id != self.id);
        self.taps.open.store(taps.1.len(), Ordering::Relaxed);
    }
}

impl Taps {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Tap>)> {
        self.taps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a tap on the messages `filter` matches (and, with `rule`, that rule's topic
    /// filters match too). An error when [`MAX_TAPS`] are open.
    pub fn open(
        self: &Arc<Self>,
        filter: TopicFilter,
        rule: Option<String>,
    ) -> Result<TapHandle, String> {
        let mut taps = self.lock();
        if taps.1.len() >= MAX_TAPS {
            return Err(format!("{MAX_TAPS} taps are open already"));
        }
        taps.0 += 1;
        let id = taps.0;
        let (tx, events) = mpsc::channel(TAP_QUEUE);
        taps.1.push(Tap {
            id,
            filter,
            rule,
            tx,
            tokens: f64::from(TAP_RATE),
            refilled: Instant::now(),
            skipped: 0,
        });
        self.open.store(taps.1.len(), Ordering::Relaxed);
        Ok(TapHandle {
            id,
            taps: self.clone(),
            events,
        })
    }

    /// True when a tap may want a message on `topic`: one atomic load when none is open.
    pub(crate) fn wants(&self, topic: &str) -> bool {
        if self.open.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.lock().1.iter().any(|t| t.filter.matches(topic))
    }

    /// Shows each tap that wants it what became of the message on `topic`.
    pub(crate) fn offer(&self, topic: &str, outcome: &'static str, seen: Seen) {
        let mut taps = self.lock();
        let now = Instant::now();
        for tap in taps.1.iter_mut() {
            if !tap.filter.matches(topic) {
                continue;
            }
            let rule_index = match (&tap.rule, &seen.topology) {
                (Some(name), Some(topology)) => {
                    match topology.router.rules().iter().position(|r| &r.name == name) {
                        // the rule is not there (any more), or does not listen here
                        Some(i)
                            if topology.router.rules()[i]
                                .from
                                .iter()
                                .any(|f| f.matches(topic)) =>
                        {
                            Some(i)
                        }
                        _ => continue,
                    }
                }
                (Some(_), None) => continue,
                (None, _) => None,
            };
            let rate = f64::from(TAP_RATE);
            tap.tokens =
                (tap.tokens + now.duration_since(tap.refilled).as_secs_f64() * rate).min(rate);
            tap.refilled = now;
            if tap.tokens < 1.0 {
                tap.skipped += 1;
                continue;
            }
            tap.tokens -= 1.0;
            let event = TapEvent {
                topic: topic.to_string(),
                received: seen.received.unwrap_or_else(Utc::now),
                outcome,
                message: seen.message.clone(),
                rules: rule_events(&seen, rule_index),
                skipped: tap.skipped,
            };
            match tap.tx.try_send(event) {
                Ok(()) => tap.skipped = 0,
                Err(_) => tap.skipped += 1,
            }
        }
    }
}

fn rule_events(seen: &Seen, only: Option<usize>) -> Vec<RuleEvent> {
    let Some(topology) = &seen.topology else {
        return Vec::new();
    };
    let names = |sinks: &[usize]| -> Vec<String> {
        sinks
            .iter()
            .filter_map(|&s| topology.sink_names.get(s).cloned())
            .collect()
    };
    seen.trace
        .iter()
        .filter(|t| only.is_none_or(|r| r == t.rule))
        .map(|t| {
            let (outcome, error, made, sinks) = match &t.what {
                TraceStep::Filtered => ("filtered", None, None, Vec::new()),
                TraceStep::ConditionError(e) => {
                    ("condition-error", Some(e.clone()), None, Vec::new())
                }
                TraceStep::Throttled => ("throttled", None, None, Vec::new()),
                TraceStep::Deduplicated => ("deduplicated", None, None, Vec::new()),
                TraceStep::Failed(e, sinks) => ("failed", Some(e.clone()), None, names(sinks)),
                TraceStep::Sent(made, sinks) => ("sent", None, made.clone(), names(sinks)),
                TraceStep::Aggregated(None, _) => ("aggregated", None, None, Vec::new()),
                TraceStep::Aggregated(Some(rollup), sinks) => {
                    ("aggregated", None, Some(rollup.clone()), names(sinks))
                }
            };
            RuleEvent {
                rule: topology
                    .router
                    .rules()
                    .get(t.rule)
                    .map(|r| r.name.clone())
                    .unwrap_or_default(),
                part: t.part,
                outcome,
                error,
                made,
                sinks,
            }
        })
        .collect()
}
