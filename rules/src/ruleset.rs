//! The rules file: `[sinks.NAME]` tables and `[[rules]]`, parsed with positions so that
//! every problem is reported as `file:line:col`, all problems at once.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use fleetbus_config::{parse_toml, problems_of, ConfigError, InvalidConfig};
use fleetbus_sinks::{builtin_dead_letters, SinkConfig, SinkKind, BUILTIN_DEAD_LETTERS};
use serde::Deserialize;
use toml::Spanned;

use crate::aggregate::Aggregate;
use crate::condition::Condition;
use crate::filter::TopicFilter;
use crate::stateful::{Gate, GateKind, Rate, DEFAULT_MAX_KEYS};
use crate::transform::{Expression, FieldPath, Transforms, FOREACH_VARIABLES};

/// The rules every `fleetbus serve` runs when its configuration names no rules file:
/// archive every telemetry record in daily JSON-lines files per agent and stream, keep
/// uploaded files, and fold event records and check results into the event console.
pub const DEFAULT_RULES: &str = r#"
[sinks.archive]
type = "file"
path = "telemetry/{agent}/{stream}/%Y-%m-%d.jsonl"

[sinks.uploads]
type = "file"
path = "uploads/{agent}/{file.id}-{file.name}"

[[rules]]
name = "archive-all"
from = ["fleet/+/telemetry/#"]
to = ["archive"]

[sinks.console]
type = "console"

[[rules]]
name = "uploads"
from = ["fleet/+/files/+/complete"]
to = ["uploads"]

[[rules]]
name = "console"
from = ["fleet/+/telemetry/events", "fleet/+/telemetry/checks"]
where = "has(record.event) || has(record.check)"
to = ["console"]
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    sinks: BTreeMap<String, Spanned<SinkConfig>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    tests: Vec<Spanned<crate::rule_tests::RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    from: Spanned<Vec<Spanned<String>>>,
    #[serde(rename = "where", default)]
    condition: Option<Spanned<String>>,
    to: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    foreach: Option<Spanned<String>>,
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    rename: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    drop: Vec<Spanned<String>>,
    #[serde(default)]
    keep: Vec<Spanned<String>>,
    #[serde(default)]
    throttle: Option<Spanned<RawGate>>,
    #[serde(default)]
    dedupe: Option<Spanned<RawGate>>,
    #[serde(default)]
    on_error: Option<Spanned<String>>,
    #[serde(default)]
    aggregate: Option<Spanned<RawAggregate>>,
}

/// `aggregate = { key, value, window, max_keys }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    #[serde(default)]
    key: Option<Spanned<String>>,
    #[serde(default)]
    value: Option<Spanned<String>>,
    window: Spanned<String>,
    #[serde(default)]
    max_keys: Option<Spanned<usize>>,
}

/// `throttle = { key, rate, max_keys }` or `dedupe = { key, window, max_keys }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    #[serde(default)]
    key: Option<Spanned<String>>,
    #[serde(default)]
    rate: Option<Spanned<String>>,
    #[serde(default)]
    window: Option<Spanned<String>>,
    #[serde(default)]
    max_keys: Option<Spanned<usize>>,
}

fn yes() -> bool {
    true
}

/// One validated rule.
#[derive(Debug)]
pub struct Rule {
    /// Unique name (used in logs and metrics).
    pub name: String,
    /// What the rule is for.
    pub description: Option<String>,
    /// Topic filters the rule listens to.
    pub from: Vec<TopicFilter>,
    /// Optional condition.
    pub condition: Option<Condition>,
    /// Indexes into [`RuleSet::sinks`].
    pub to: Vec<usize>,
    /// One message per element of this list.
    pub foreach: Option<Expression>,
    /// `set`, `rename`, `drop`, `keep`.
    pub transforms: Transforms,
    /// `dedupe`, then `throttle`, when set.
    pub gates: Vec<Gate>,
    /// Tumbling windows per key, each closing into one roll-up message.
    pub aggregate: Option<Aggregate>,
    /// Where a message goes when a transform fails for it (index into
    /// [`RuleSet::sinks`]; the built-in dead-letter sink unless the rule names one).
    pub on_error: usize,
}

impl Rule {
    /// True when the rule makes new messages (`foreach` or a transform) rather than
    /// passing them on as published.
    pub fn makes_messages(&self) -> bool {
        self.foreach.is_some() || !self.transforms.is_empty() || self.aggregate.is_some()
    }
}

/// A validated rules file: sinks and the enabled rules.
#[derive(Debug)]
pub struct RuleSet {
    /// Sinks by name, in name order, then the built-in dead-letter sink
    /// ([`BUILTIN_DEAD_LETTERS`]).
    pub sinks: Vec<(String, SinkConfig)>,
    /// Enabled rules in file order.
    pub rules: Vec<Rule>,
    /// The file's `[[tests]]`.
    pub tests: Vec<crate::rule_tests::RuleTest>,
}

/// Every problem found in a rules file, each naming file, line and column.
pub type RulesError = InvalidConfig;

impl RuleSet {
    /// The sinks the file defines (without the built-in dead-letter sink).
    pub fn own_sinks(&self) -> impl Iterator<Item = &(String, SinkConfig)> {
        self.sinks.iter().filter(|(n, _)| n != BUILTIN_DEAD_LETTERS)
    }

    /// Reads and validates the rules file at `path`.
    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let text = fleetbus_config::read(path)?;
        RuleSet::parse(path, &text)
    }

    /// The built-in [`DEFAULT_RULES`].
    pub fn builtin() -> Result<RuleSet, RulesError> {
        RuleSet::parse(Path::new("<built-in rules>"), DEFAULT_RULES)
    }

    /// Validates `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<RuleSet, RulesError> {
        let raw: RawFile = parse_toml(path, text)?;
        let mut problems = Vec::new();
        let at = |span: std::ops::Range<usize>, msg: String| ConfigError::at(path, text, span, msg);

        let mut sinks = Vec::new();
        for (name, config) in &raw.sinks {
            if let Err(e) = fleetbus_protocol::validate_id("sink name", name) {
                problems.push(at(config.span(), e.to_string()));
            }
            if name == BUILTIN_DEAD_LETTERS {
                problems.push(at(
                    config.span(),
                    format!("sink name `{name}` is reserved for the built-in dead-letter sink"),
                ));
            }
            for problem in problems_of(config.get_ref()) {
                // at its key when the file sets it; a key left out is placed at the table
                let key = format!("sinks.{name}.{}", problem.key);
                let span = match problem.key.is_empty() {
                    true => None,
                    false => fleetbus_config::key_span(text, &key),
                };
                let span = span.unwrap_or_else(|| config.span());
                problems.push(at(span, format!("sink `{name}`: {problem}")));
            }
            // computed columns: the variables a `where` may use and `dead_letter`, checked
            // the same way
            for (column, source) in config.get_ref().computed_columns().into_iter().flatten() {
                let Ok(program) = cel::Program::compile(source) else {
                    continue; // reported by the sink's own check
                };
                let more = fleetbus_sinks::columns::COLUMN_VARIABLES;
                for problem in crate::schema::check_with(program.expression(), &[], &more) {
                    let key = format!("sinks.{name}.columns.{column}");
                    let span = fleetbus_config::key_span(text, &key).unwrap_or(config.span());
                    problems.push(at(
                        span,
                        format!("sink `{name}`: columns.{column}: {problem}"),
                    ));
                }
            }
            sinks.push((name.clone(), config.get_ref().clone()));
        }
        for (name, config) in &raw.sinks {
            if let Some(target) = &config.get_ref().dead_letter {
                if target == name {
                    problems.push(at(
                        config.span(),
                        format!("sink `{name}`: dead_letter cannot be the sink itself"),
                    ));
                } else if !raw.sinks.contains_key(target) && target != BUILTIN_DEAD_LETTERS {
                    problems.push(at(
                        config.span(),
                        format!("sink `{name}`: dead_letter names unknown sink `{target}`"),
                    ));
                }
            }
        }
        // always there: where messages that can never be written go
        sinks.push((BUILTIN_DEAD_LETTERS.to_string(), builtin_dead_letters()));
        let sink_index = |name: &str| sinks.iter().position(|(n, _)| n == name);

        let mut names = HashSet::new();
        let mut rules = Vec::new();
        let mut rule_spans = Vec::new();
        for raw_rule in &raw.rules {
            let r = raw_rule.get_ref();
            let name = r.name.get_ref().trim().to_string();
            if name.is_empty() {
                problems.push(at(r.name.span(), "rule name is empty".into()));
            } else if !names.insert(name.clone()) {
                problems.push(at(r.name.span(), format!("duplicate rule name `{name}`")));
            }
            let mut from = Vec::new();
            if r.from.get_ref().is_empty() {
                problems.push(at(
                    r.from.span(),
                    format!("rule `{name}`: `from` names no topic filter"),
                ));
            }
            for f in r.from.get_ref() {
                match TopicFilter::parse(f.get_ref()) {
                    Ok(filter) => from.push(filter),
                    Err(e) => problems.push(at(
                        f.span(),
                        format!("rule `{name}`: bad topic filter: {e}"),
                    )),
                }
            }
            // under `foreach`, expressions see the element too
            let more: &[&str] = match r.foreach {
                Some(_) => &FOREACH_VARIABLES,
                None => &[],
            };
            let condition = match &r.condition {
                Some(src) => match Condition::compile_with(src.get_ref(), &from, more) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        problems.push(at(
                            src.span(),
                            format!("rule `{name}`: bad `where` expression: {e}"),
                        ));
                        None
                    }
                },
                None => None,
            };
            let mut to = Vec::new();
            if r.to.get_ref().is_empty() {
                problems.push(at(
                    r.to.span(),
                    format!("rule `{name}`: `to` names no sink"),
                ));
            }
            for s in r.to.get_ref() {
                match sink_index(s.get_ref()) {
                    Some(i) if !to.contains(&i) => to.push(i),
                    Some(_) => {}
                    None => {
                        let known: Vec<&str> = sinks.iter().map(|(n, _)| n.as_str()).collect();
                        problems.push(at(
                            s.span(),
                            format!(
                                "rule `{name}`: unknown sink `{}` (defined: {})",
                                s.get_ref(),
                                if known.is_empty() {
                                    "none".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    }
                }
            }
            let expression = |problems: &mut Vec<ConfigError>,
                              key: &str,
                              src: &Spanned<String>,
                              more: &[&str]| {
                match Expression::compile(src.get_ref(), &from, more) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        problems.push(at(
                            src.span(),
                            format!("rule `{name}`: bad `{key}` expression: {e}"),
                        ));
                        None
                    }
                }
            };
            let foreach = r
                .foreach
                .as_ref()
                .and_then(|src| expression(&mut problems, "foreach", src, &[]));
            let mut transforms = Transforms::default();
            for (path, src) in &r.set {
                let expr = expression(&mut problems, &format!("set.{path}"), src, more);
                match (FieldPath::parse(path), expr) {
                    (Ok(p), Some(e)) => transforms.set.push((p, e)),
                    (Err(e), _) => {
                        problems.push(at(src.span(), format!("rule `{name}`: set: {e}")))
                    }
                    _ => {}
                }
            }
            let mut gates = Vec::new();
            for (what, raw) in [("dedupe", &r.dedupe), ("throttle", &r.throttle)] {
                let Some(raw) = raw else { continue };
                let g = raw.get_ref();
                let key = g
                    .key
                    .as_ref()
                    .and_then(|src| expression(&mut problems, &format!("{what}.key"), src, more));
                let kind = match (what, &g.rate, &g.window) {
                    ("throttle", Some(rate), None) => Rate::parse(rate.get_ref())
                        .map(GateKind::Throttle)
                        .map_err(|e| (rate.span(), e)),
                    ("dedupe", None, Some(window)) => humantime::parse_duration(window.get_ref())
                        .map_err(|e| (window.span(), format!("`{}`: {e}", window.get_ref())))
                        .and_then(|d| match d.as_millis() {
                            0 => Err((window.span(), "the window must be above zero".to_string())),
                            _ => Ok(GateKind::Dedupe(d)),
                        }),
                    ("throttle", _, _) => Err((
                        raw.span(),
                        "needs `rate` (e.g. \"10/1m\") and no `window`".into(),
                    )),
                    _ => Err((
                        raw.span(),
                        "needs `window` (e.g. \"10m\") and no `rate`".into(),
                    )),
                };
                if what == "dedupe" && g.key.is_none() {
                    problems.push(at(
                        raw.span(),
                        format!("rule `{name}`: dedupe: needs a `key`"),
                    ));
                }
                let max_keys = match &g.max_keys {
                    Some(m) if *m.get_ref() == 0 => {
                        problems.push(at(
                            m.span(),
                            format!("rule `{name}`: {what}.max_keys: must be at least 1"),
                        ));
                        1
                    }
                    Some(m) => *m.get_ref(),
                    None => DEFAULT_MAX_KEYS,
                };
                match kind {
                    Ok(kind) if g.key.is_none() || key.is_some() => gates.push(Gate {
                        kind,
                        key,
                        max_keys,
                    }),
                    Ok(_) => {}
                    Err((span, e)) => {
                        problems.push(at(span, format!("rule `{name}`: {what}: {e}")))
                    }
                }
            }
            for (old, new) in &r.rename {
                match (FieldPath::parse(old), FieldPath::parse(new.get_ref())) {
                    (Ok(a), Ok(b)) => transforms.rename.push((a, b)),
                    (Err(e), _) | (_, Err(e)) => {
                        problems.push(at(new.span(), format!("rule `{name}`: rename: {e}")))
                    }
                }
            }
            for (key, list) in [("drop", &r.drop), ("keep", &r.keep)] {
                for path in list {
                    match FieldPath::parse(path.get_ref()) {
                        Ok(p) if key == "drop" => transforms.drop.push(p),
                        Ok(p) => transforms.keep.push(p),
                        Err(e) => {
                            problems.push(at(path.span(), format!("rule `{name}`: {key}: {e}")))
                        }
                    }
                }
            }
            let aggregate = r.aggregate.as_ref().and_then(|raw| {
                let a = raw.get_ref();
                let key = a
                    .key
                    .as_ref()
                    .and_then(|src| expression(&mut problems, "aggregate.key", src, more));
                let value = a
                    .value
                    .as_ref()
                    .and_then(|src| expression(&mut problems, "aggregate.value", src, more));
                let window = match humantime::parse_duration(a.window.get_ref()) {
                    Ok(d) if d.as_millis() > 0 => Some(d),
                    Ok(_) => {
                        problems.push(at(a.window.span(), format!("rule `{name}`: aggregate.window: must be above zero")));
                        None
                    }
                    Err(e) => {
                        problems.push(at(a.window.span(), format!("rule `{name}`: aggregate.window `{}`: {e}", a.window.get_ref())));
                        None
                    }
                };
                let max_keys = match &a.max_keys {
                    Some(m) if *m.get_ref() == 0 => {
                        problems.push(at(m.span(), format!("rule `{name}`: aggregate.max_keys: must be at least 1")));
                        1
                    }
                    Some(m) => *m.get_ref(),
                    None => DEFAULT_MAX_KEYS,
                };
                if !r.set.is_empty() || !r.rename.is_empty() || !r.drop.is_empty() || !r.keep.is_empty() {
                    problems.push(at(raw.span(), format!("rule `{name}`: aggregate sends its roll-ups as they are: `set`, `rename`, `drop` and `keep` cannot go with it")));
                }
                let ok = window.is_some()
                    && (a.key.is_none() || key.is_some())
                    && (a.value.is_none() || value.is_some());
                ok.then(|| Aggregate {
                    key,
                    value,
                    window: window.unwrap_or_default(),
                    max_keys,
                })
            });
            let on_error = match &r.on_error {
                None => sink_index(BUILTIN_DEAD_LETTERS).unwrap_or(0),
                Some(s) => match sink_index(s.get_ref()) {
                    Some(i) => i,
                    None => {
                        problems.push(at(
                            s.span(),
                            format!(
                                "rule `{name}`: on_error names unknown sink `{}`",
                                s.get_ref()
                            ),
                        ));
                        0
                    }
                },
            };
            if r.enabled {
                rule_spans.push(r.name.span());
                rules.push(Rule {
                    name,
                    description: r.description.clone(),
                    from,
                    condition,
                    to,
                    foreach,
                    transforms,
                    gates,
                    aggregate,
                    on_error,
                });
            }
        }
        for (rule, way_round) in republishing_loops(&sinks, &rules) {
            problems.push(at(
                rule_spans[rule].clone(),
                format!(
                    "rule `{}`: its messages can come back to it through the server's own broker: {way_round}",
                    rules[rule].name
                ),
            ));
        }
        let names: Vec<&str> = sinks.iter().map(|(n, _)| n.as_str()).collect();
        let tests = crate::rule_tests::compile(&raw.tests, &names, path, text, &mut problems);
        if problems.is_empty() {
            Ok(RuleSet {
                sinks,
                rules,
                tests,
            })
        } else {
            Err(RulesError { problems })
        }
    }

    /// Every distinct topic filter of every rule (what to subscribe to).
    pub fn filters(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in self.rules.iter().flat_map(|r| &r.from) {
            if !out.iter().any(|o| o == f.as_str()) {
                out.push(f.as_str().to_string());
            }
        }
        out
    }
}

/// Every rule whose messages can come back to it through sinks that republish into the
/// server's own broker (`mqtt` sinks without `url`; a sink's dead letters count as its
/// messages), with the way round in words. Such a loop would republish without end.
fn republishing_loops(sinks: &[(String, SinkConfig)], rules: &[Rule]) -> Vec<(usize, String)> {
    let republished: Vec<Option<TopicFilter>> = sinks
        .iter()
        .map(|(_, config)| match &config.kind {
            SinkKind::Mqtt(m) => m
                .republished_filter()
                .and_then(|f| TopicFilter::parse(&f).ok()),
            _ => None,
        })
        .collect();
    // the sinks a rule's messages reach: its own, and their dead-letter sinks in turn
    let reached = |rule: &Rule| {
        let mut out: Vec<usize> = rule.to.clone();
        if !out.contains(&rule.on_error) {
            out.push(rule.on_error);
        }
        let mut n = 0;
        while n < out.len() {
            let next = sinks[out[n]]
                .1
                .dead_letter
                .as_deref()
                .and_then(|dl| sinks.iter().position(|(name, _)| name == dl));
            if let Some(next) = next.filter(|s| !out.contains(s)) {
                out.push(next);
            }
            n += 1;
        }
        out
    };
    // rule -> (the sink, the rule that takes what it republishes)
    let edges: Vec<Vec<(usize, usize)>> = rules
        .iter()
        .map(|rule| {
            let mut out = Vec::new();
            for sink in reached(rule) {
                let Some(filter) = &republished[sink] else {
                    continue;
                };
                for (j, other) in rules.iter().enumerate() {
                    if other.from.iter().any(|f| f.overlaps(filter)) {
                        out.push((sink, j));
                    }
                }
            }
            out
        })
        .collect();
    let mut loops = Vec::new();
    for start in 0..rules.len() {
        // breadth first from `start`, remembering how each rule was reached
        let mut came_from: Vec<Option<(usize, usize)>> = vec![None; rules.len()];
        let mut queue = std::collections::VecDeque::from([start]);
        let mut back = None;
        while let Some(i) = queue.pop_front() {
            for &(sink, j) in &edges[i] {
                if j == start {
                    back = Some((i, sink));
                    break;
                }
                if came_from[j].is_none() {
                    came_from[j] = Some((i, sink));
                    queue.push_back(j);
                }
            }
            if back.is_some() {
                break;
            }
        }
        let Some((mut at, mut sink)) = back else {
            continue;
        };
        let mut steps = Vec::new();
        let mut to = start;
        loop {
            let filter = republished[sink].as_ref().map(|f| f.as_str()).unwrap_or("");
            let taken = rules[to]
                .from
                .iter()
                .find(|f| republished[sink].as_ref().is_some_and(|r| f.overlaps(r)))
                .map(|f| f.as_str())
                .unwrap_or("");
            steps.push(format!(
                "rule `{}` → sink `{}` republishes on `{filter}` → rule `{}` takes `{taken}`",
                rules[at].name, sinks[sink].0, rules[to].name
            ));
            if at == start {
                break;
            }
            to = at;
            (at, sink) = came_from[at].unwrap_or((start, sink));
        }
        steps.reverse();
        loops.push((start, steps.join("; ")));
    }
    loops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match RuleSet::parse(Path::new("r.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn builtin_rules_are_valid() {
        let rs = RuleSet::builtin().unwrap();
        assert_eq!(rs.rules.len(), 3);
        assert_eq!(
            rs.filters(),
            vec![
                "fleet/+/telemetry/#",
                "fleet/+/files/+/complete",
                "fleet/+/telemetry/events",
                "fleet/+/telemetry/checks"
            ]
        );
    }

    #[test]
    fn a_rule_that_can_republish_into_its_own_from_is_refused() {
        let sinks = r#"[sinks.alerts]
type = "mqtt"
topic = "alerts/{agent}/{stream}"

[sinks.bridge]
type = "mqtt"
topic = "alerts/{agent}"
url = "mqtt://central.example:1883"

[sinks.flaky]
type = "http"
url = "http://127.0.0.1:9/hook"
dead_letter = "alerts"
"#;
        // republishing fleet traffic elsewhere, and bridging, are fine
        let fine = format!(
            "{sinks}[[rules]]\nname = \"up\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"alerts\"]\n\
             [[rules]]\nname = \"out\"\nfrom = [\"alerts/#\"]\nto = [\"bridge\"]\n"
        );
        assert!(problems(&fine).is_empty(), "{:#?}", problems(&fine));
        // directly
        let direct = format!(
            "{sinks}[[rules]]\nname = \"echo\"\nfrom = [\"alerts/+/heartbeat\"]\nto = [\"alerts\"]\n"
        );
        let p = problems(&direct);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].ends_with(
                "rule `echo`: its messages can come back to it through the server's own broker: \
                 rule `echo` → sink `alerts` republishes on `alerts/+/+` → rule `echo` takes `alerts/+/heartbeat`"
            ),
            "{}",
            p[0]
        );
        // through another rule and a sink's dead letters
        let round = format!(
            "{sinks}[[rules]]\nname = \"one\"\nfrom = [\"alerts/#\"]\nto = [\"flaky\"]\n\
             [[rules]]\nname = \"two\"\nfrom = [\"x/y\"]\nto = [\"bridge\"]\n"
        );
        let p = problems(&round);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("rule `one` → sink `alerts` republishes on `alerts/+/+` → rule `one` takes `alerts/#`"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_position() {
        let text = r#"[sinks.a]
type = "file"
path = "x/{agent}.jsonl"

[[rules]]
name = "r1"
from = ["fleet/#/x"]
where = "record.seq >"
to = ["a", "nope"]
"#;
        let p = problems(text);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].starts_with("r.toml:7:9: rule `r1`: bad topic filter"),
            "{}",
            p[0]
        );
        assert!(
            p[1].starts_with("r.toml:8:9: rule `r1`: bad `where` expression"),
            "{}",
            p[1]
        );
        assert!(
            p[2].starts_with(
                "r.toml:9:12: rule `r1`: unknown sink `nope` (defined: a, fleetbus.dead-letters)"
            ),
            "{}",
            p[2]
        );
    }

    #[test]
    fn unknown_keys_and_bad_sinks_are_reported() {
        let p = problems("[[rules]]\nname = \"r\"\nfrom = [\"a\"]\nto = []\nfilter = 1\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("unknown field `filter`"), "{}", p[0]);
        assert!(p[0].starts_with("r.toml:5:1"), "{}", p[0]);

        let p = problems("[sinks.a]\ntype = \"file\"\npth = \"x\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("unknown field `pth`"), "{}", p[0]);

        let p = problems("[sinks.a]\ntype = \"file\"\npath = \"/abs/{agent}\"\n");
        assert!(p[0].starts_with("r.toml:3:1: sink `a`: path:"), "{}", p[0]);
        // a required key left out is placed at its table
        let p = problems("\n[sinks.a]\ntype = \"s3\"\n");
        assert!(
            p[0].starts_with("r.toml:2:1: missing field `bucket`"),
            "{}",
            p[0]
        );

        let p = problems("[sinks.a]\ntype = \"carrier-pigeon\"\n");
        assert!(p[0].contains("carrier-pigeon"), "{}", p[0]);
    }

    #[test]
    fn a_misspelt_sink_key_common_or_of_its_type_is_placed_in_the_file() {
        let p =
            problems("[sinks.a]\ntype = \"file\"\npath = \"x\"\n[sinks.a.batch]\nmax_evnts = 5\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("r.toml:5:1: "), "{}", p[0]);
        assert!(p[0].contains("unknown field `max_evnts`"), "{}", p[0]);

        let p = problems("\n[sinks.a]\ntype = \"s3\"\nbuckt = \"b\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("r.toml:2:"), "{}", p[0]);
        assert!(p[0].contains("unknown field `buckt`"), "{}", p[0]);
    }

    #[test]
    fn every_problem_of_a_sink_is_reported_at_once_with_its_key() {
        let text = "[sinks.a]\ntype = \"s3\"\nbucket = \"\"\npart_size = 1\n\
                    [sinks.a.buffer]\nmax_bytes = 1\n[sinks.a.batch]\nmax_attempts = 3\n";
        let p = problems(text);
        // each at the line of its key
        let expected = [
            "r.toml:6:1: sink `a`: buffer.max_bytes: must be at least 1 MiB",
            "r.toml:8:1: sink `a`: batch.max_attempts: needs a `dead_letter` sink",
            "r.toml:3:1: sink `a`: bucket: is empty",
            "r.toml:4:1: sink `a`: part_size: must be at least 5242880 bytes",
        ];
        assert_eq!(p.len(), expected.len(), "{p:#?}");
        for (got, want) in p.iter().zip(expected) {
            assert!(got.starts_with(want), "{got}\n  expected {want}");
        }
    }

    #[test]
    fn computed_columns_are_checked_like_conditions_at_their_keys() {
        let text = "[sinks.db]\ntype = \"sqlite\"\npath = \"x.db\"\n\
                    [sinks.db.columns]\nhost = \"record.host\"\nload = \"recod.load\"\n\
                    seq = \"record.seq\"\nbad = \"record.seq >\"\n\
                    why = \"dead_letter == null ? '' : dead_letter.error\"\n";
        let p = problems(text);
        // `dead_letter` is a computed column's variable
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p.iter()
                .any(|t| t.starts_with("r.toml:6:1: sink `db`: columns.load: ")
                    && t.contains("unknown variable `recod`")
                    && t.contains("record, dead_letter)")),
            "{p:#?}"
        );
        assert!(
            p.iter().any(|t| t.starts_with("r.toml:7:1: sink `db`: columns.seq: `seq` is a key column")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|t| t.starts_with("r.toml:8:1: sink `db`: columns.bad: ")),
            "{p:#?}"
        );
    }

    #[test]
    fn a_batch_key_replaces_only_its_own_default() {
        let text = "[sinks.out]\ntype = \"stdout\"\n\
                    [sinks.s3]\ntype = \"s3\"\nbucket = \"b\"\ndead_letter = \"out\"\n\
                    [sinks.s3.batch]\nmax_attempts = 3\n\
                    [sinks.plain]\ntype = \"file\"\npath = \"x\"\n";
        let rules = RuleSet::parse(Path::new("r.toml"), text).unwrap();
        let batch = |name: &str| {
            rules
                .sinks
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.batch())
                .unwrap()
        };
        // the S3 sink keeps its own defaults for the keys it does not set
        let s3 = batch("s3");
        assert_eq!(s3.max_attempts, 3);
        assert_eq!(s3.max_events, 10_000);
        assert_eq!(s3.max_age, std::time::Duration::from_secs(5));
        assert_eq!(batch("plain").max_events, 1_000);
    }

    #[test]
    fn duplicate_rule_names_and_disabled_rules() {
        let text = r##"[sinks.a]
type = "stdout"
[[rules]]
name = "x"
from = ["#"]
to = ["a"]
[[rules]]
name = "x"
from = ["#"]
to = ["a"]
enabled = false
"##;
        let p = problems(text);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("duplicate rule name `x`"));
    }
}
