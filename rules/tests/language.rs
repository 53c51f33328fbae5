//! The rules language end to end without I/O: a rules file with every transform and
//! stateful operation, and `[[tests]]` saying what each must do, run through the real
//! router. The tests that must fail show the differences a user would read.

use std::path::Path;

use fleetbus_rules::router::Router;
use fleetbus_rules::rule_tests;
use fleetbus_rules::RuleSet;

const RULES: &str = r#"
[sinks.influx]
type = "stdout"
[sinks.pg]
type = "stdout"
[sinks.archive]
type = "stdout"
[sinks.dead]
type = "stdout"
[sinks.rollups]
type = "stdout"

[[rules]]
name = "disk-points"
from = ["fleet/+/telemetry/metrics"]
foreach = "record.metrics"
where = 'item.name.startsWith("disk.")'
set = { host = "record.host", mount = "item.labels.mount", "tags.agent" = "agent", n = "index" }
rename = { value = "used_percent" }
drop = ["labels"]
to = ["influx"]
on_error = "dead"

[[rules]]
name = "slim-events"
from = ["fleet/+/telemetry/events"]
keep = ["event.rule", "event.severity", "ts"]
dedupe = { key = "agent + '/' + record.event.rule", window = "10m" }
to = ["pg"]
on_error = "dead"

[[rules]]
name = "noisy-logs"
from = ["fleet/+/telemetry/logs"]
throttle = { key = "agent", rate = "3/1m" }
to = ["archive"]

[[rules]]
name = "cpu-per-minute"
from = ["fleet/+/telemetry/cpu"]
aggregate = { key = "agent", value = "record.value", window = "1m" }
to = ["rollups"]
on_error = "dead"

[[rules]]
name = "by-topic"
from = ["site/+/sensors/#", "fleet/+/telemetry/names"]
where = '(agent == "" && segments[1] == "s1") || (agent == "w1" && stream == "names")'
set = { seen = "topic + '|' + agent + '|' + stream + '|' + segments[1]" }
to = ["archive"]

[[tests]]
name = "a condition and a transform read the topic, its segments, the agent and the stream"
inputs = [
  { topic = "site/s1/sensors/t", record = { v = 1 } },
  { topic = "site/s2/sensors/t", record = { v = 2 } },
  { topic = "fleet/w1/telemetry/names", record = { v = 3 } },
  { topic = "fleet/w2/telemetry/names", record = { v = 4 } },
]
expect = [{ sink = "archive", count = 2, where = '(msg.seen == "site/s1/sensors/t|||s1" && msg.v == 1) || (msg.seen == "fleet/w1/telemetry/names|w1|names|w1" && msg.v == 3)' }]

[[tests]]
name = "a minute of samples per agent becomes one roll-up, closed by the next minute or the end"
inputs = [
  { topic = "fleet/a/telemetry/cpu", record = { value = 10.0 } },
  { topic = "fleet/a/telemetry/cpu", record = { value = 30.0 }, after = "10s" },
  { topic = "fleet/b/telemetry/cpu", record = { value = 5 } },
  { topic = "fleet/a/telemetry/cpu", record = { value = 50.0 }, after = "1m" },
]
expect = [{ sink = "rollups", count = 3, where = '''msg.stream == "cpu" && msg.agent == msg.key && ((msg.key == "a" && msg.count == 2u && msg.sum == 40.0 && msg.avg == 20.0 && msg.min == 10.0 && msg.max == 30.0 && msg.last == 30.0) || (msg.key == "b" && msg.count == 1u && msg.sum == 5.0) || (msg.key == "a" && msg.count == 1u && msg.last == 50.0))''' }]

[[tests]]
name = "a value that is not a number goes to on_error"
input = { topic = "fleet/a/telemetry/cpu", record = { value = "high" } }
expect = [{ sink = "dead", count = 1, error = "not a number" }]

[[tests]]
name = "a disk metric becomes one point, other metrics none"
input = { topic = "fleet/web-01/telemetry/metrics", record = { host = "h1", metrics = [{ name = "disk.used_percent", value = 91.0, labels = { mount = "/" } }, { name = "cpu.usage", value = 3.0 }] } }
expect = [{ sink = "influx", count = 1, where = '''msg.mount == "/" && msg.used_percent == 91.0 && msg.host == "h1" && msg.tags.agent == "web-01" && msg.n == 0 && !has(msg.labels) && !has(msg.value) && msg.agent == "web-01"''' }]

[[tests]]
name = "no disk metric, no output"
input = { topic = "fleet/web-01/telemetry/metrics", record = { host = "h1", metrics = [{ name = "cpu.usage", value = 3.0 }] } }
expect = []

[[tests]]
name = "a metric the transform cannot read goes to on_error with the reason"
input = { topic = "fleet/web-01/telemetry/metrics", record = { host = "h1", metrics = [{ name = "disk.free", value = 1.0 }] } }
expect = [{ sink = "dead", count = 1, error = "set.mount", where = 'msg.metrics[0].name == "disk.free"' }]

[[tests]]
name = "metrics that are not a list go to on_error"
input = { topic = "fleet/web-01/telemetry/metrics", json = '{"metrics": 5}' }
expect = [{ sink = "dead", count = 1, error = "not a list" }]

[[tests]]
name = "a repeated event passes once per window, slimmed"
inputs = [
  { topic = "fleet/a/telemetry/events", record = { ts = "2026-01-01T00:00:00Z", event = { rule = "disk", severity = 4, text = "full" } }, repeat = 3 },
  { topic = "fleet/b/telemetry/events", record = { event = { rule = "disk", severity = 4 } } },
  { topic = "fleet/a/telemetry/events", record = { event = { rule = "disk", severity = 5 } }, after = "9m" },
  { topic = "fleet/a/telemetry/events", record = { event = { rule = "disk", severity = 5 } }, after = "1m" },
]
expect = [{ sink = "pg", count = 3, where = '!has(msg.event.text) && msg.event.rule == "disk" && msg.stream == "events"' }]

[[tests]]
name = "logs are throttled per agent"
inputs = [
  { topic = "fleet/a/telemetry/logs", json = '{"line": "x"}', repeat = 5 },
  { topic = "fleet/b/telemetry/logs", json = '{"line": "y"}', repeat = 2 },
  { topic = "fleet/a/telemetry/logs", json = '{"line": "z"}', after = "20s", repeat = 2 },
]
expect = [{ sink = "archive", count = 6 }]
"#;

fn names(set: &RuleSet) -> Vec<String> {
    set.sinks.iter().map(|(n, _)| n.clone()).collect()
}

fn run_all(text: &str) -> Vec<(String, Result<(), String>)> {
    let set = RuleSet::parse(Path::new("rules.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    let sinks = names(&set);
    let sinks: Vec<&str> = sinks.iter().map(String::as_str).collect();
    let RuleSet { rules, tests, .. } = set;
    let router = Router::new(rules);
    tests
        .iter()
        .map(|t| (t.name.clone(), rule_tests::run(&router, &sinks, t)))
        .collect()
}

#[test]
fn every_transform_and_stateful_operation_does_what_its_tests_say() {
    let results = run_all(RULES);
    assert_eq!(results.len(), 9);
    for (name, result) in results {
        assert!(
            result.is_ok(),
            "test `{name}` failed:\n{}",
            result.unwrap_err()
        );
    }
}

#[test]
fn a_failing_test_says_what_each_sink_got() {
    let text = format!(
        "{RULES}\n[[tests]]\nname = \"wrong\"\n\
         input = {{ topic = \"fleet/a/telemetry/logs\", json = '{{\"line\": 1}}', repeat = 4 }}\n\
         expect = [{{ sink = \"archive\", count = 4 }}, {{ sink = \"pg\" }}]\n\
         [[tests]]\nname = \"unexpected\"\n\
         input = {{ topic = \"fleet/a/telemetry/logs\", json = '{{\"line\": 1}}' }}\n\
         expect = []\n\
         [[tests]]\nname = \"where\"\n\
         input = {{ topic = \"fleet/a/telemetry/logs\", json = '{{\"line\": 1}}' }}\n\
         expect = [{{ sink = \"archive\", where = 'msg.line == 2' }}]\n"
    );
    let results = run_all(&text);
    let diff = |name: &str| {
        results
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, r)| r.clone().err())
            .unwrap_or_else(|| panic!("test `{name}` should fail"))
    };
    let wrong = diff("wrong");
    assert!(
        wrong.contains("sink `archive`: expected 4 messages, got 3:\n    {\"agent\":\"a\",\"line\":1,\"stream\":\"logs\"}"),
        "{wrong}"
    );
    assert!(
        wrong.contains("sink `pg`: expected at least one message, got none"),
        "{wrong}"
    );
    let unexpected = diff("unexpected");
    assert!(
        unexpected.starts_with("sink `archive`: expected nothing, got 1:"),
        "{unexpected}"
    );
    let wher = diff("where");
    assert!(wher.contains("`msg.line == 2` is Bool(false)"), "{wher}");
    // the others still pass: every test starts from empty state
    assert_eq!(results.iter().filter(|(_, r)| r.is_ok()).count(), 9);
}

#[test]
fn every_problem_of_the_new_keys_is_placed() {
    let text = r#"[sinks.a]
type = "stdout"
[[rules]]
name = "r"
from = ["fleet/+/telemetry/metrics"]
foreach = "record.metrics.("
set = { "a..b" = "1", ok = "nope + 1" }
rename = { x = "" }
drop = [".y"]
throttle = { rate = "ten a minute" }
dedupe = { window = "10m" }
on_error = "nowhere"
to = ["a"]
[[tests]]
name = "t"
input = { topic = "x", record = {}, json = "{}" }
expect = [{ sink = "b", where = "msg.x >" }]
"#;
    let problems: Vec<String> = match RuleSet::parse(Path::new("r.toml"), text) {
        Ok(_) => panic!("should be refused"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    };
    let expect = [
        "r.toml:6:11: rule `r`: bad `foreach` expression",
        "r.toml:7:18: rule `r`: set: `a..b` is not a field path",
        "r.toml:7:28: rule `r`: bad `set.ok` expression: unknown variable `nope`",
        "r.toml:11:10: rule `r`: dedupe: needs a `key`",
        "r.toml:10:21: rule `r`: throttle: `ten a minute` is not a rate",
        "r.toml:8:16: rule `r`: rename: `` is not a field path",
        "r.toml:9:9: rule `r`: drop: `.y` is not a field path",
        "r.toml:12:12: rule `r`: on_error names unknown sink `nowhere`",
        "r.toml:16:9: test `t`: an input has exactly one of `record`, `json` and `payload`",
        "r.toml:17:20: test `t`: unknown sink `b`",
        "r.toml:17:33: test `t`: bad `where` expression",
    ];
    for want in expect {
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "missing {want}\n{problems:#?}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

#[test]
fn an_aggregate_is_checked_at_its_keys() {
    let text = r#"[sinks.a]
type = "stdout"
[[rules]]
name = "r"
from = ["fleet/+/telemetry/cpu"]
aggregate = { key = "agnt", value = "record.value", window = "0s", max_keys = 0 }
set = { x = "1" }
to = ["a"]
"#;
    let problems: Vec<String> = match RuleSet::parse(Path::new("r.toml"), text) {
        Ok(_) => panic!("should be refused"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    };
    for want in [
        "rule `r`: bad `aggregate.key` expression: unknown variable `agnt`",
        "rule `r`: aggregate.window: must be above zero",
        "rule `r`: aggregate.max_keys: must be at least 1",
        "rule `r`: aggregate sends its roll-ups as they are",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "missing {want}\n{problems:#?}"
        );
    }
    assert!(
        problems.iter().all(|p| p.starts_with("r.toml:6:")),
        "{problems:#?}"
    );
}
