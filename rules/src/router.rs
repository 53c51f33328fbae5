//! The compiled router: which sinks a message goes to, and what the rules' transforms make
//! of it.
//!
//! Routing is two steps, so that nothing a message does to a rule's state happens unless
//! the message is accepted:
//!
//! 1. [`Router::route`] (no state, any thread): for each rule whose topic filters match,
//!    `foreach`, `where`, the stateful operations' keys and the transforms, into a
//!    [`Routing`]. [`Routing::targets`] then says every sink the message could reach (what
//!    the engine checks backpressure against).
//! 2. [`Router::settle`], once the message is known to be new and accepted: the stateful
//!    operations (`dedupe`, then `throttle`) decide, `aggregate` folds it into its window
//!    (a window it closes makes a roll-up), the counters move, and the routing says which
//!    sinks take the message as published ([`Routing::direct`]) and which messages the
//!    rules made ([`Routing::produced`]). [`Router::close_windows`] closes the windows
//!    whose time is over.
//!
//! A rule without `foreach` and transforms passes the message on as published: every such
//! rule's sinks share one copy. Each message a rule makes goes to that rule's sinks, and a
//! message a transform fails for goes, as published and with the error, to the rule's
//! `on_error` sink.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cel::{Context, Value as CelValue};
use fleetbus_protocol::Message;
use serde_json::Value;

use crate::aggregate::Windows;
use crate::filter_index::FilterIndex;
use crate::record_use::RecordUse;
use crate::ruleset::Rule;
use crate::stateful::{GateState, Verdict};
use fleetbus_sinks::columns::MessageVariables;

/// One rule's state: its gates' and its open windows.
#[derive(Debug, Default)]
struct RuleState {
    gates: Vec<GateState>,
    windows: Windows,
}

/// Counters of one rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    seen: AtomicU64,
    matched: AtomicU64,
    filtered: AtomicU64,
    condition_errors: AtomicU64,
    throttled: AtomicU64,
    deduplicated: AtomicU64,
    untracked: AtomicU64,
    errors: AtomicU64,
    aggregated: AtomicU64,
    produced: AtomicU64,
}

impl RuleStats {
    fn counters(&self) -> [&AtomicU64; 10] {
        [
            &self.aggregated,
            &self.seen,
            &self.matched,
            &self.filtered,
            &self.condition_errors,
            &self.throttled,
            &self.deduplicated,
            &self.untracked,
            &self.errors,
            &self.produced,
        ]
    }
}

/// A copy of one rule's counters. Under `foreach` the counts after `seen` are of elements
/// (a `foreach` that fails counts one). They balance: `matched` = `throttled` +
/// `deduplicated` + `errors` + `produced` (+ `aggregated`, whose roll-ups count in
/// `produced` when their windows close).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleStatsSnapshot {
    /// The rule's name.
    pub rule: String,
    /// Messages its topic filters matched.
    pub seen: u64,
    /// Messages (elements) its `where` let through (all, without one), and failures of
    /// `foreach` itself.
    pub matched: u64,
    /// Messages (elements) its `where` turned away.
    pub filtered: u64,
    /// Messages (elements) whose `where` could not be evaluated (turned away too).
    pub condition_errors: u64,
    /// Held back by `throttle`.
    pub throttled: u64,
    /// Held back by `dedupe`.
    pub deduplicated: u64,
    /// Let through by a stateful operation whose table of keys was full.
    pub untracked: u64,
    /// Transforms that failed: the message went to the rule's `on_error` sink.
    pub errors: u64,
    /// Messages (elements) folded into an `aggregate` window.
    pub aggregated: u64,
    /// Messages the rule sent to its sinks (as published, or made by its transforms).
    pub produced: u64,
}

/// What a rule made of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Made {
    /// A new message (its body).
    Message(Value),
    /// The transforms failed, with this error: the message as published goes to the
    /// rule's `on_error` sink.
    Failed(String),
}

/// One message a rule made, or a failure, with where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The rule (its index in the router).
    pub rule: usize,
    /// Which of the rule's messages for this input (under `foreach`, the element's index).
    pub part: u32,
    /// The message, or the error.
    pub made: Made,
    /// The sinks it goes to (the rule's `to`, or its `on_error`).
    pub sinks: Vec<usize>,
    /// Its topic when not the input's: an `aggregate` roll-up's is that of its window's
    /// last message.
    pub topic: Option<String>,
}

#[derive(Debug)]
struct Unit {
    rule: usize,
    part: u32,
    /// One key per gate of the rule, in order.
    keys: Vec<String>,
    /// `None`: the message as published.
    made: Option<Made>,
    /// For an `aggregate` rule: the message's key and value, folded into its window.
    fold: Option<(String, Option<f64>)>,
}

/// What the rules do with one message: filled by [`Router::route`], decided by
/// [`Router::settle`]. Reused from message to message.
#[derive(Debug, Default)]
pub struct Routing {
    units: Vec<Unit>,
    /// The rules whose filters may match (reused).
    candidates: Vec<usize>,
    /// The message's topic, kept for an `aggregate` window.
    topic: String,
    seen: Vec<usize>,
    filtered: Vec<usize>,
    condition_errors: Vec<usize>,
    /// After [`Router::settle`]: the sinks that take the message as published.
    pub direct: Vec<usize>,
    /// After [`Router::settle`]: the messages the rules made, and the failures.
    pub produced: Vec<Output>,
    /// When `Some` (set before [`Router::route`]), what each rule did, for a live view
    /// (`fleetbus rules tap`); `None` costs nothing.
    pub trace: Option<Vec<Traced>>,
}

/// What one rule did with a message (or a `foreach` element), for a live view.
#[derive(Debug, Clone, PartialEq)]
pub struct Traced {
    /// The rule (its index in the router).
    pub rule: usize,
    /// Which of its messages (under `foreach`, the element's index).
    pub part: u32,
    /// What happened.
    pub what: TraceStep,
}

/// How a rule's handling of a message ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceStep {
    /// Its `where` turned the message away.
    Filtered,
    /// Its `where` could not be evaluated (turned away), and why.
    ConditionError(String),
    /// Held back by its `throttle`.
    Throttled,
    /// Held back by its `dedupe`.
    Deduplicated,
    /// A transform failed: the message went to `on_error` (the sinks) with this error.
    Failed(String, Vec<usize>),
    /// Sent on to these sinks: as published (`None`) or the message the rule made.
    Sent(Option<Value>, Vec<usize>),
    /// Folded into its `aggregate` window; the roll-up of a window it closed, sent to
    /// these sinks.
    Aggregated(Option<Value>, Vec<usize>),
}

impl Routing {
    /// Every sink the message could reach (before the stateful operations decide): a
    /// sink once.
    pub fn targets(&self, rules: &Router) -> Vec<usize> {
        let mut out = Vec::new();
        for unit in &self.units {
            let rule = &rules.rules[unit.rule];
            let sinks = match unit.made {
                Some(Made::Failed(_)) => std::slice::from_ref(&rule.on_error),
                _ => &rule.to[..],
            };
            for &s in sinks {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// True when no rule wants the message.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    fn clear(&mut self) {
        if let Some(trace) = self.trace.as_mut() {
            trace.clear();
        }
        self.units.clear();
        self.seen.clear();
        self.filtered.clear();
        self.condition_errors.clear();
        self.direct.clear();
        self.produced.clear();
    }
}

/// Rules compiled for routing, with their counters and the state of their stateful
/// operations.
#[derive(Debug)]
pub struct Router {
    rules: Vec<Rule>,
    /// Which rules can match a topic ([`FilterIndex`]).
    index: FilterIndex,
    /// What the rules' expressions read of `record`: the context carries only that.
    record_use: RecordUse,
    /// Whether any expression reads `segments` (else the context has none).
    segments: bool,
    /// Whether any rule aggregates.
    aggregates: bool,
    stats: Vec<RuleStats>,
    /// Per rule: its gates' state and its open windows.
    state: Mutex<Vec<RuleState>>,
}

impl Router {
    /// A router over `rules`.
    pub fn new(rules: Vec<Rule>) -> Router {
        let stats = rules.iter().map(|_| RuleStats::default()).collect();
        let state = rules
            .iter()
            .map(|r| RuleState {
                gates: r.gates.iter().map(|_| GateState::default()).collect(),
                windows: Windows::default(),
            })
            .collect();
        let index = FilterIndex::new(
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.from.as_slice())),
        );
        let aggregates = rules.iter().any(|r| r.aggregate.is_some());
        let mut record_use = RecordUse::Nothing;
        let mut segments = false;
        for rule in &rules {
            if let Some(c) = &rule.condition {
                record_use.add(&c.record_use());
                segments |= c.names("segments");
            }
            let keys = rule.gates.iter().filter_map(|g| g.key.as_ref());
            let sets = rule.transforms.set.iter().map(|(_, e)| e);
            let folds = rule
                .aggregate
                .iter()
                .flat_map(|a| a.key.iter().chain(a.value.iter()));
            for e in rule.foreach.iter().chain(keys).chain(sets).chain(folds) {
                record_use.add(&e.record_use());
                segments |= e.names("segments");
            }
        }
        Router {
            rules,
            index,
            record_use,
            segments,
            aggregates,
            stats,
            state: Mutex::new(state),
        }
    }

    /// True when a rule aggregates (has windows to close).
    pub fn aggregates(&self) -> bool {
        self.aggregates
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Step 1: what every rule would do with `msg` (see the module documentation).
    pub fn route(&self, msg: &Message, routing: &mut Routing) {
        routing.clear();
        // the CEL context is built lazily, once per message, only if an expression needs it
        let variables = MessageVariables::new(msg, self.record_use.fields(), self.segments);
        let mut ctx: Option<Context<'_, '_>> = None;
        if self.aggregates {
            msg.topic.clone_into(&mut routing.topic);
        }
        let mut candidates = std::mem::take(&mut routing.candidates);
        self.index.candidates(&msg.topic, &mut candidates);
        for &index in &candidates {
            // the index gives exactly the rules with a matching filter
            let rule = &self.rules[index];
            routing.seen.push(index);
            if rule.foreach.is_none()
                && rule.condition.is_none()
                && rule.gates.is_empty()
                && rule.transforms.is_empty()
                && rule.aggregate.is_none()
            {
                routing.units.push(Unit {
                    rule: index,
                    part: 0,
                    keys: Vec::new(),
                    made: None,
                    fold: None,
                });
                continue;
            }
            let ctx = ctx.get_or_insert_with(|| variables.context());
            match &rule.foreach {
                None => self.one(index, rule, Base::Published(&msg.body), 0, ctx, routing),
                Some(list) => match list.evaluate(ctx) {
                    Ok(CelValue::List(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            let part = u32::try_from(i).unwrap_or(u32::MAX);
                            let mut inner = ctx.new_inner_scope();
                            inner.add_variable_from_value("item", item.clone());
                            inner.add_variable_from_value("index", i as i64);
                            let base = match fleetbus_sinks::columns::to_json(item) {
                                Ok(v) => Base::Element(crate::transform::element_base(&v)),
                                Err(e) => {
                                    routing.units.push(failed(
                                        index,
                                        part,
                                        format!("foreach element {i}: {e}"),
                                    ));
                                    continue;
                                }
                            };
                            self.one(index, rule, base, part, &inner, routing);
                        }
                    }
                    Ok(other) => routing.units.push(failed(
                        index,
                        0,
                        format!(
                            "foreach: `{}` is a {:?}, not a list",
                            list.source(),
                            other.type_of()
                        ),
                    )),
                    Err(e) => routing
                        .units
                        .push(failed(index, 0, format!("foreach: {e}"))),
                },
            }
        }
        routing.candidates = candidates;
    }

    /// One message (or `foreach` element) of a rule: `where`, the gates' keys, the
    /// transforms.
    fn one(
        &self,
        index: usize,
        rule: &Rule,
        base: Base,
        part: u32,
        ctx: &Context,
        routing: &mut Routing,
    ) {
        if let Some(cond) = &rule.condition {
            match cond.evaluate_in(ctx) {
                Ok(true) => {}
                Ok(false) => {
                    routing.filtered.push(index);
                    if let Some(trace) = routing.trace.as_mut() {
                        trace.push(Traced {
                            rule: index,
                            part,
                            what: TraceStep::Filtered,
                        });
                    }
                    return;
                }
                Err(e) => {
                    routing.condition_errors.push(index);
                    if let Some(trace) = routing.trace.as_mut() {
                        trace.push(Traced {
                            rule: index,
                            part,
                            what: TraceStep::ConditionError(e.to_string()),
                        });
                    }
                    tracing::debug!(rule = %rule.name, error = %e, "condition could not be evaluated: no match");
                    return;
                }
            }
        }
        let mut keys = Vec::with_capacity(rule.gates.len());
        for gate in &rule.gates {
            match &gate.key {
                None => keys.push(String::new()),
                Some(k) => match k.evaluate_key(ctx) {
                    Ok(key) => keys.push(key),
                    Err(e) => {
                        routing.units.push(failed(
                            index,
                            part,
                            format!("key `{}`: {e}", k.source()),
                        ));
                        return;
                    }
                },
            }
        }
        if let Some(agg) = &rule.aggregate {
            let key = match &agg.key {
                None => Ok(String::new()),
                Some(k) => k
                    .evaluate_key(ctx)
                    .map_err(|e| format!("aggregate.key `{}`: {e}", k.source())),
            };
            let value = match &agg.value {
                None => Ok(None),
                Some(v) => v
                    .evaluate(ctx)
                    .map_err(|e| format!("aggregate.value `{}`: {e}", v.source()))
                    .and_then(|x| match x {
                        CelValue::Int(n) => Ok(Some(n as f64)),
                        CelValue::UInt(n) => Ok(Some(n as f64)),
                        CelValue::Float(n) => Ok(Some(n)),
                        other => Err(format!(
                            "aggregate.value `{}` is a {:?}, not a number",
                            v.source(),
                            other.type_of()
                        )),
                    }),
            };
            routing.units.push(match (key, value) {
                (Ok(key), Ok(value)) => Unit {
                    rule: index,
                    part,
                    keys,
                    made: None,
                    fold: Some((key, value)),
                },
                (Err(e), _) | (_, Err(e)) => failed(index, part, e),
            });
            return;
        }
        let base = match base {
            Base::Published(_) if rule.transforms.is_empty() => None,
            // copied only for a rule that changes it
            Base::Published(body) => Some(body.clone()),
            Base::Element(element) => Some(element),
        };
        let made = base.map(|base| match rule.transforms.apply(base, ctx) {
            Ok(body) => Made::Message(body),
            Err(e) => Made::Failed(e),
        });
        routing.units.push(Unit {
            rule: index,
            part,
            keys,
            made,
            fold: None,
        });
    }

    /// Step 2: the stateful operations decide (with the time the message was received),
    /// the counters move, and [`Routing::direct`] and [`Routing::produced`] are filled.
    pub fn settle(&self, routing: &mut Routing, now_ms: i64) {
        for &r in &routing.seen {
            self.stats[r].seen.fetch_add(1, Ordering::Relaxed);
        }
        for &r in &routing.filtered {
            self.stats[r].filtered.fetch_add(1, Ordering::Relaxed);
        }
        for &r in &routing.condition_errors {
            self.stats[r]
                .condition_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        let any_gate = routing
            .units
            .iter()
            .any(|u| !u.keys.is_empty() || u.fold.is_some());
        let mut state = any_gate.then(|| self.state.lock().unwrap_or_else(|p| p.into_inner()));
        for unit in routing.units.drain(..) {
            let rule = &self.rules[unit.rule];
            let stats = &self.stats[unit.rule];
            stats.matched.fetch_add(1, Ordering::Relaxed);
            if let Some(Made::Failed(error)) = unit.made {
                to_on_error(
                    (&mut routing.trace, &mut routing.produced),
                    stats,
                    (unit.rule, rule),
                    unit.part,
                    error,
                );
                continue;
            }
            let mut held = false;
            if let Some(state) = state.as_mut() {
                for (g, (gate, key)) in rule.gates.iter().zip(&unit.keys).enumerate() {
                    match state[unit.rule].gates[g].admit(gate, key, now_ms) {
                        Verdict::Pass => {}
                        Verdict::Untracked => {
                            stats.untracked.fetch_add(1, Ordering::Relaxed);
                        }
                        Verdict::Held => {
                            let counter = match gate.kind {
                                crate::stateful::GateKind::Throttle(_) => &stats.throttled,
                                crate::stateful::GateKind::Dedupe(_) => &stats.deduplicated,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if let Some(trace) = routing.trace.as_mut() {
                                trace.push(Traced {
                                    rule: unit.rule,
                                    part: unit.part,
                                    what: match gate.kind {
                                        crate::stateful::GateKind::Throttle(_) => {
                                            TraceStep::Throttled
                                        }
                                        crate::stateful::GateKind::Dedupe(_) => {
                                            TraceStep::Deduplicated
                                        }
                                    },
                                });
                            }
                            held = true;
                            break;
                        }
                    }
                }
            }
            if held {
                continue;
            }
            if let (Some((key, value)), Some(agg), Some(state)) =
                (unit.fold, &rule.aggregate, state.as_mut())
            {
                let folded = state[unit.rule]
                    .windows
                    .fold(agg, key, value, &routing.topic, now_ms);
                match folded {
                    Ok(closed) => {
                        stats.aggregated.fetch_add(1, Ordering::Relaxed);
                        if let Some(trace) = routing.trace.as_mut() {
                            trace.push(Traced {
                                rule: unit.rule,
                                part: unit.part,
                                what: TraceStep::Aggregated(
                                    closed.as_ref().map(|c| c.body.clone()),
                                    rule.to.clone(),
                                ),
                            });
                        }
                        if let Some(closed) = closed {
                            stats.produced.fetch_add(1, Ordering::Relaxed);
                            routing.produced.push(Output {
                                rule: unit.rule,
                                part: 0,
                                made: Made::Message(closed.body),
                                sinks: rule.to.clone(),
                                topic: Some(closed.topic),
                            });
                        }
                    }
                    Err(error) => to_on_error(
                        (&mut routing.trace, &mut routing.produced),
                        stats,
                        (unit.rule, rule),
                        unit.part,
                        error,
                    ),
                }
                continue;
            }
            stats.produced.fetch_add(1, Ordering::Relaxed);
            if let Some(trace) = routing.trace.as_mut() {
                let made = match &unit.made {
                    Some(Made::Message(body)) => Some(body.clone()),
                    _ => None,
                };
                trace.push(Traced {
                    rule: unit.rule,
                    part: unit.part,
                    what: TraceStep::Sent(made, rule.to.clone()),
                });
            }
            match unit.made {
                None => {
                    for &s in &rule.to {
                        if !routing.direct.contains(&s) {
                            routing.direct.push(s);
                        }
                    }
                }
                Some(made) => routing.produced.push(Output {
                    rule: unit.rule,
                    part: unit.part,
                    made,
                    sinks: rule.to.clone(),
                    topic: None,
                }),
            }
        }
    }

    /// Closes every `aggregate` window whose end is at or before `now_ms` (with `all`,
    /// every window, those not over marked partial): one roll-up each, for its rule's
    /// sinks, on its own topic.
    pub fn close_windows(&self, now_ms: i64, all: bool) -> Vec<Output> {
        if !self.aggregates {
            return Vec::new();
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let Some(agg) = &rule.aggregate else { continue };
            for closed in state[index].windows.close_due(agg, now_ms, all) {
                self.stats[index].produced.fetch_add(1, Ordering::Relaxed);
                out.push(Output {
                    rule: index,
                    part: 0,
                    made: Made::Message(closed.body),
                    sinks: rule.to.clone(),
                    topic: Some(closed.topic),
                });
            }
        }
        out
    }

    /// Steps 1 and 2 at once, for a message known to be accepted (tests, tools).
    pub fn route_and_settle(&self, msg: &Message, routing: &mut Routing) {
        self.route(msg, routing);
        self.settle(routing, msg.received.timestamp_millis());
    }

    /// Carries over from `old` (the router a reload replaces) what belongs to the rules
    /// both have by name: the counters, and the state of each stateful operation whose
    /// configuration (kind, key, bound) is unchanged. Called while no message is routed.
    pub fn take_state_from(&self, old: &Router) {
        let mut old_state = old.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(j) = old.rules.iter().position(|r| r.name == rule.name) else {
                continue;
            };
            for (mine, theirs) in self.stats[i]
                .counters()
                .into_iter()
                .zip(old.stats[j].counters())
            {
                mine.store(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            for (g, gate) in rule.gates.iter().enumerate() {
                let print = gate.fingerprint();
                if let Some(h) = old.rules[j]
                    .gates
                    .iter()
                    .position(|o| o.fingerprint() == print)
                {
                    state[i].gates[g] = std::mem::take(&mut old_state[j].gates[h]);
                }
            }
            if let (Some(mine), Some(theirs)) = (&rule.aggregate, &old.rules[j].aggregate) {
                if mine.fingerprint() == theirs.fingerprint() {
                    state[i].windows = std::mem::take(&mut old_state[j].windows);
                }
            }
        }
    }

    /// Back to the start: counters at zero, the stateful operations' state empty (before
    /// and after each `[[tests]]` run).
    pub fn reset(&self) {
        for s in &self.stats {
            for c in s.counters() {
                c.store(0, Ordering::Relaxed);
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for rule in state.iter_mut() {
            for g in rule.gates.iter_mut() {
                *g = GateState::default();
            }
            rule.windows = Windows::default();
        }
    }

    /// Every rule's counters.
    pub fn stats(&self) -> Vec<RuleStatsSnapshot> {
        self.rules
            .iter()
            .zip(&self.stats)
            .map(|(r, s)| {
                let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
                RuleStatsSnapshot {
                    rule: r.name.clone(),
                    seen: get(&s.seen),
                    matched: get(&s.matched),
                    filtered: get(&s.filtered),
                    condition_errors: get(&s.condition_errors),
                    throttled: get(&s.throttled),
                    deduplicated: get(&s.deduplicated),
                    untracked: get(&s.untracked),
                    errors: get(&s.errors),
                    aggregated: get(&s.aggregated),
                    produced: get(&s.produced),
                }
            })
            .collect()
    }
}

/// The payload a message a rule made is stored and sent as: its body as JSON.
pub fn encode_made(body: &Value) -> Vec<u8> {
    // a `Value` always serializes (its keys are strings)
    serde_json::to_vec(body).unwrap_or_default()
}

/// A transform of rule `index` failed for part `part` of a message: counted, traced (into
/// the routing's trace), and the message goes to the rule's `on_error` sink with the error
/// (into its `produced`).
fn to_on_error(
    (trace, produced): (&mut Option<Vec<Traced>>, &mut Vec<Output>),
    stats: &RuleStats,
    (index, rule): (usize, &Rule),
    part: u32,
    error: String,
) {
    stats.errors.fetch_add(1, Ordering::Relaxed);
    if let Some(trace) = trace.as_mut() {
        trace.push(Traced {
            rule: index,
            part,
            what: TraceStep::Failed(error.clone(), vec![rule.on_error]),
        });
    }
    tracing::debug!(rule = %rule.name, %error, "transform failed: the message goes to the rule's on_error sink");
    produced.push(Output {
        rule: index,
        part,
        made: Made::Failed(error),
        sinks: vec![rule.on_error],
        topic: None,
    });
}

/// What a rule's transforms start from.
enum Base<'a> {
    /// The message as published (passed on as it is when the rule has no transforms).
    Published(&'a Value),
    /// A `foreach` element (always a new message).
    Element(Value),
}

fn failed(rule: usize, part: u32, error: String) -> Unit {
    Unit {
        rule,
        part,
        keys: Vec::new(),
        made: Some(Made::Failed(error)),
        fold: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RuleSet;
    use std::path::Path;

    struct Names(Vec<String>);

    fn sink_names(set: &Names, sinks: &[usize]) -> Vec<String> {
        let mut v: Vec<String> = sinks.iter().map(|&i| set.0[i].clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn fan_out_conditions_and_dedup() {
        let text = r#"
[sinks.archive]
type = "stdout"
[sinks.alerts]
type = "stdout"
[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["archive"]
[[rules]]
name = "hot"
from = ["fleet/+/telemetry/metrics"]
where = 'record.metrics.exists(m, m.name == "cpu.usage" && m.value > 90.0)'
to = ["alerts", "archive"]
"#;
        let RuleSet { sinks, rules, .. } = RuleSet::parse(Path::new("r.toml"), text).unwrap();
        let set = Names(sinks.into_iter().map(|(n, _)| n).collect());
        let router = Router::new(rules);
        let mut out = Routing::default();
        let hot = Message::decode(
            "fleet/a/telemetry/metrics",
            br#"{"metrics":[{"name":"cpu.usage","value":95.0}]}"#,
        )
        .unwrap();
        router.route_and_settle(&hot, &mut out);
        assert_eq!(
            sink_names(&set, &out.direct),
            ["alerts", "archive"],
            "archive once, alerts once"
        );
        assert!(out.produced.is_empty());
        let cool = Message::decode(
            "fleet/a/telemetry/metrics",
            br#"{"metrics":[{"name":"cpu.usage","value":5.0}]}"#,
        )
        .unwrap();
        router.route_and_settle(&cool, &mut out);
        assert_eq!(sink_names(&set, &out.direct), ["archive"]);
        let other = Message::decode("other/topic", b"{}").unwrap();
        router.route_and_settle(&other, &mut out);
        assert!(out.direct.is_empty() && out.is_empty());
        let stats = router.stats();
        assert_eq!(
            (
                stats[0].rule.as_str(),
                stats[0].seen,
                stats[0].matched,
                stats[0].produced
            ),
            ("all", 2, 2, 2)
        );
        assert_eq!(
            (
                stats[1].seen,
                stats[1].matched,
                stats[1].filtered,
                stats[1].produced
            ),
            (2, 1, 1, 1)
        );
    }
}
