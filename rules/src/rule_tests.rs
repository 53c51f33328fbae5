//! `[[tests]]`: what rules must do with given messages, checked by `fleetbus rules test`
//! and `fleetbus rules check`, and before a reload is accepted. A test runs the real
//! router ([`Router::route_and_settle`]: filters, conditions, transforms, stateful
//! operations) and looks at what each sink would get, as the sink would get it.
//!
//! ```toml
//! [[tests]]
//! name = "a disk metric becomes one point"
//! input = { topic = "fleet/web-01/telemetry/metrics", record = { metrics = [{ name = "disk.used", value = 91.0 }] } }
//! expect = [{ sink = "influx", count = 1, where = 'msg.value == 91.0' }]
//! ```
//!
//! - `input` is one message, `inputs` several in order (each with `repeat = N` to send it
//!   N times, `after = "1m"` for the time since the message before). A message is a
//!   `topic` and one of `record` (a table, published as JSON), `json` (JSON text) or
//!   `payload` (the bytes of a string as they are).
//! - `expect` lists every sink that gets something: a sink left out must get nothing, and
//!   `expect = []` means no sink gets anything. Each entry names its `sink`, and may give
//!   `count` (exactly that many messages; without it, at least one), `where` (CEL every
//!   message to the sink must satisfy: `msg` is the message body, `topic`, `agent`,
//!   `stream` and `error`, the reason of a message a rule sent to its `on_error` sink, `""`
//!   for the others) and `error` (text every message's reason must contain: the messages
//!   went to the sink as transform failures).
//!
//! Each test starts from empty state (counters and stateful operations).

use std::path::Path;
use std::time::Duration;

use cel::Program;
use chrono::{TimeZone, Utc};
use fleetbus_config::ConfigError;
use fleetbus_protocol::Message;
use serde::Deserialize;
use toml::Spanned;

use crate::router::{Made, Router, Routing};

/// A `[[tests]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTest {
    name: Spanned<String>,
    #[serde(default)]
    input: Option<Spanned<RawInput>>,
    #[serde(default)]
    inputs: Vec<Spanned<RawInput>>,
    expect: Vec<Spanned<RawExpect>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    topic: String,
    #[serde(default)]
    record: Option<toml::Table>,
    #[serde(default)]
    json: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    repeat: Option<u32>,
    #[serde(default)]
    after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    sink: Spanned<String>,
    #[serde(default)]
    count: Option<usize>,
    #[serde(rename = "where", default)]
    condition: Option<Spanned<String>>,
    #[serde(default)]
    error: Option<String>,
}

/// One test's input message.
#[derive(Debug, Clone)]
pub struct TestInput {
    /// The topic it is published on.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// How many times it is sent.
    pub repeat: u32,
    /// Time since the message before.
    pub after: Duration,
}

/// What one sink must get.
#[derive(Debug)]
pub struct Expectation {
    /// The sink's name.
    pub sink: String,
    /// Exactly this many messages (`None`: at least one).
    pub count: Option<usize>,
    /// Every message satisfies this.
    pub condition: Option<(String, Program)>,
    /// Every message is a transform failure whose reason contains this.
    pub error: Option<String>,
}

/// One compiled `[[tests]]` table.
#[derive(Debug)]
pub struct RuleTest {
    /// Its name.
    pub name: String,
    /// Where it is written (`file:line:col`).
    pub place: String,
    /// The messages, in order.
    pub inputs: Vec<TestInput>,
    /// Every sink that gets something.
    pub expect: Vec<Expectation>,
}

/// The variables of an expectation's `where` beyond those of a rule's.
const EXPECT_VARIABLES: [&str; 2] = ["msg", "error"];

/// Compiles `raw` (from `path`, whose contents are `text`) against the sinks `sinks`,
/// recording each problem at its place.
pub(crate) fn compile(
    raw: &[Spanned<RawTest>],
    sinks: &[&str],
    path: &Path,
    text: &str,
    problems: &mut Vec<ConfigError>,
) -> Vec<RuleTest> {
    let at = |span: std::ops::Range<usize>, msg: String| ConfigError::at(path, text, span, msg);
    let mut tests = Vec::new();
    for t in raw {
        let r = t.get_ref();
        let name = r.name.get_ref().clone();
        let place = {
            let (line, col) = fleetbus_config::line_col(text, r.name.span().start);
            format!("{}:{line}:{col}", path.display())
        };
        let mut inputs = Vec::new();
        let all: Vec<&Spanned<RawInput>> = r.input.iter().chain(&r.inputs).collect();
        if all.is_empty() {
            problems.push(at(
                t.span(),
                format!("test `{name}`: needs `input` or `inputs`"),
            ));
        }
        for input in all {
            let i = input.get_ref();
            let payload = match (&i.record, &i.json, &i.payload) {
                (Some(record), None, None) => serde_json::to_vec(record).ok(),
                (None, Some(json), None) => Some(json.clone().into_bytes()),
                (None, None, Some(raw)) => Some(raw.clone().into_bytes()),
                _ => None,
            };
            let Some(payload) = payload else {
                problems.push(at(
                    input.span(),
                    format!(
                        "test `{name}`: an input has exactly one of `record`, `json` and `payload`"
                    ),
                ));
                continue;
            };
            let after = match &i.after {
                None => Duration::ZERO,
                Some(a) => match humantime::parse_duration(a) {
                    Ok(d) => d,
                    Err(e) => {
                        problems.push(at(input.span(), format!("test `{name}`: after `{a}`: {e}")));
                        Duration::ZERO
                    }
                },
            };
            inputs.push(TestInput {
                topic: i.topic.clone(),
                payload,
                repeat: i.repeat.unwrap_or(1),
                after,
            });
        }
        let mut expect = Vec::new();
        for e in &r.expect {
            let e = e.get_ref();
            let sink = e.sink.get_ref();
            if !sinks.contains(&sink.as_str()) {
                problems.push(at(
                    e.sink.span(),
                    format!(
                        "test `{name}`: unknown sink `{sink}` (defined: {})",
                        sinks.join(", ")
                    ),
                ));
            }
            if e.count == Some(0) {
                problems.push(at(
                    e.sink.span(),
                    format!("test `{name}`: `count = 0`: leave the sink out of `expect` instead"),
                ));
            }
            let condition = e.condition.as_ref().and_then(|src| {
                let compiled = Program::compile(src.get_ref())
                    .map_err(|e| {
                        e.to_string()
                            .replace("ERROR: <input>:", "expression position ")
                    })
                    .and_then(|p| {
                        let found =
                            crate::schema::check_with(p.expression(), &[], &EXPECT_VARIABLES);
                        match found.is_empty() {
                            true => Ok(p),
                            false => Err(found.join("; ")),
                        }
                    });
                match compiled {
                    Ok(p) => Some((src.get_ref().clone(), p)),
                    Err(msg) => {
                        problems.push(at(
                            src.span(),
                            format!("test `{name}`: bad `where` expression: {msg}"),
                        ));
                        None
                    }
                }
            });
            expect.push(Expectation {
                sink: sink.clone(),
                count: e.count,
                condition,
                error: e.error.clone(),
            });
        }
        tests.push(RuleTest {
            name,
            place,
            inputs,
            expect,
        });
    }
    tests
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestFile {
    #[serde(default)]
    tests: Vec<Spanned<RawTest>>,
}

/// Reads the `[[tests]]` of a file of tests alone, for a rule set with sinks `sinks`.
pub fn load(path: &Path, sinks: &[&str]) -> Result<Vec<RuleTest>, crate::RulesError> {
    let text = fleetbus_config::read(path)?;
    let raw: RawTestFile = fleetbus_config::parse_toml(path, &text)?;
    let mut problems = Vec::new();
    let tests = compile(&raw.tests, sinks, path, &text, &mut problems);
    match problems.is_empty() {
        true => Ok(tests),
        false => Err(crate::RulesError { problems }),
    }
}

/// What one sink got in a test.
struct Got {
    /// The message body as the sink gets it (JSON text), and the reason when it is a
    /// transform failure.
    messages: Vec<(Message, Option<String>)>,
}

/// Runs `test` through `router` (whose sinks are `sinks`, by index) from empty state:
/// `Ok`, or the differences, one per line.
pub fn run(router: &Router, sinks: &[&str], test: &RuleTest) -> Result<(), String> {
    router.reset();
    let mut got: Vec<Got> = sinks
        .iter()
        .map(|_| Got {
            messages: Vec::new(),
        })
        .collect();
    let mut problems = Vec::new();
    let start = Utc
        .timestamp_millis_opt(1_800_000_000_000)
        .single()
        .unwrap_or_default();
    let mut now = start;
    let mut routing = Routing::default();
    for (n, input) in test.inputs.iter().enumerate() {
        now += chrono::Duration::from_std(input.after).unwrap_or_default();
        let mut msg = match Message::decode(&input.topic, &input.payload) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("input {}: cannot be decoded: {e}", n + 1));
                continue;
            }
        };
        msg.received = now;
        for _ in 0..input.repeat {
            router.route_and_settle(&msg, &mut routing);
            for &s in &routing.direct {
                got[s].messages.push((msg.clone(), None));
            }
            let produced = std::mem::take(&mut routing.produced);
            deliver(&produced, &msg, now, &mut got, &mut problems);
        }
    }
    // the inputs are over: every open `aggregate` window closes
    if let Some(last) = test.inputs.last() {
        let produced = router.close_windows(i64::MAX, false);
        if let Ok(msg) = Message::decode(&last.topic, &last.payload) {
            deliver(&produced, &msg, now, &mut got, &mut problems);
        }
    }
    for (s, name) in sinks.iter().enumerate() {
        let messages = &got[s].messages;
        let Some(e) = test.expect.iter().find(|e| e.sink == *name) else {
            if !messages.is_empty() {
                problems.push(format!(
                    "sink `{name}`: expected nothing, got {}:{}",
                    messages.len(),
                    listing(messages)
                ));
            }
            continue;
        };
        match e.count {
            Some(c) if c != messages.len() => problems.push(format!(
                "sink `{name}`: expected {c} message{}, got {}:{}",
                if c == 1 { "" } else { "s" },
                messages.len(),
                listing(messages)
            )),
            None if messages.is_empty() => problems.push(format!(
                "sink `{name}`: expected at least one message, got none"
            )),
            _ => {}
        }
        for (i, (m, error)) in messages.iter().enumerate() {
            if let Some(want) = &e.error {
                match error {
                    Some(reason) if reason.contains(want.as_str()) => {}
                    Some(reason) => problems.push(format!(
                        "sink `{name}`: message {}: expected an error containing {want:?}, got {reason:?}",
                        i + 1
                    )),
                    None => problems.push(format!(
                        "sink `{name}`: message {}: expected an error containing {want:?}, got a message: {}",
                        i + 1,
                        m.body
                    )),
                }
            }
            if let Some((source, program)) = &e.condition {
                let mut ctx = crate::condition::context_for(m);
                if let Ok(body) = cel::to_value(&m.body) {
                    ctx.add_variable_from_value("msg", body);
                }
                ctx.add_variable_from_value("error", error.clone().unwrap_or_default());
                match program.execute(&ctx) {
                    Ok(cel::Value::Bool(true)) => {}
                    Ok(other) => problems.push(format!(
                        "sink `{name}`: message {}: `{source}` is {other:?} for {}",
                        i + 1,
                        m.body
                    )),
                    Err(err) => problems.push(format!(
                        "sink `{name}`: message {}: `{source}` failed ({err}) for {}",
                        i + 1,
                        m.body
                    )),
                }
            }
        }
    }
    router.reset();
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("\n")),
    }
}

/// Hands what the rules made of `msg` (or, for a roll-up, on its own topic) to the sinks.
fn deliver(
    produced: &[crate::router::Output],
    msg: &Message,
    now: chrono::DateTime<Utc>,
    got: &mut [Got],
    problems: &mut Vec<String>,
) {
    for out in produced {
        match &out.made {
            Made::Message(body) => {
                let made = crate::router::encode_made(body);
                let topic = out.topic.as_deref().unwrap_or(&msg.topic);
                match Message::decode(topic, &made) {
                    Ok(mut m) => {
                        m.received = now;
                        for &s in &out.sinks {
                            got[s].messages.push((m.clone(), None));
                        }
                    }
                    Err(e) => problems.push(format!("a message made cannot be decoded: {e}")),
                }
            }
            Made::Failed(error) => {
                for &s in &out.sinks {
                    got[s].messages.push((msg.clone(), Some(error.clone())));
                }
            }
        }
    }
}

/// The messages a sink got, one per line (the first 10).
fn listing(messages: &[(Message, Option<String>)]) -> String {
    let mut out = String::new();
    for (m, error) in messages.iter().take(10) {
        match error {
            Some(e) => out.push_str(&format!("\n    {} (error: {e})", m.body)),
            None => out.push_str(&format!("\n    {}", m.body)),
        }
    }
    if messages.len() > 10 {
        out.push_str(&format!("\n    ... and {} more", messages.len() - 10));
    }
    out
}

/// The outcome of one test: its name, where it is written, and `Ok` or the differences.
pub type Outcome = (String, String, Result<(), String>);

/// Runs the tests of `set` and then `more` through the set's rules, in order.
pub fn run_set(set: crate::RuleSet, more: &[RuleTest]) -> Vec<Outcome> {
    let names: Vec<String> = set.sinks.iter().map(|(n, _)| n.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let crate::RuleSet { rules, tests, .. } = set;
    let router = Router::new(rules);
    tests
        .iter()
        .chain(more)
        .map(|t| (t.name.clone(), t.place.clone(), run(&router, &names, t)))
        .collect()
}

/// The rules file at `path`, read, parsed, checked and its `[[tests]]` passed: what a
/// reload may put in effect. The error lists every problem or failing test, one per line.
pub fn load_tested(path: &Path) -> Result<crate::RuleSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let problems = |e: crate::RulesError| {
        e.problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let tested = crate::RuleSet::parse(path, &text).map_err(problems)?;
    let failures: Vec<String> = run_set(tested, &[])
        .into_iter()
        .filter_map(|(name, place, outcome)| {
            outcome
                .err()
                .map(|diff| format!("test `{name}` ({place}) failed:\n{diff}"))
        })
        .collect();
    if !failures.is_empty() {
        return Err(failures.join("\n"));
    }
    // parsed again for the caller: the tests ran on (and changed the state of) a router of
    // their own
    crate::RuleSet::parse(path, &text).map_err(problems)
}
