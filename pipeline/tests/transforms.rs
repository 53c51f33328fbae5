//! A rule's transforms and stateful operations through the durable path to real sinks: a
//! `foreach` makes one SQLite row per disk metric (computed columns read the message the
//! rule made), the records themselves reach another table once each, a metric the
//! transform cannot read sends its record with the error to the rule's `on_error` file,
//! a throttle keeps five log lines per agent and a record sent again (a duplicate) does
//! not use up its agent's allowance, and reading the log again after a crash writes no
//! row twice.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_balanced, lines, wait_for};
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;

const RULES: &str = r#"
[sinks.points]
type = "sqlite"
path = "points.sqlite"
table = "points"
columns = { name = "record.name", value = "record.value", mount = "record.mount" }

[sinks.raw]
type = "sqlite"
path = "raw.sqlite"

[sinks.dead]
type = "file"
path = "dead/{record.host | 'nohost'}/{agent}.jsonl"

# named from the messages the rule made
[sinks.by_metric]
type = "file"
path = "metrics/{record.name}/{record.mount | 'none'}.jsonl"

[sinks.logs]
type = "file"
path = "logs/{agent}.jsonl"

[[rules]]
name = "points"
from = ["fleet/+/telemetry/metrics"]
foreach = "record.metrics"
where = 'item.name.startsWith("disk.")'
set = { mount = "item.labels.mount" }
to = ["points", "by_metric"]
on_error = "dead"

[[rules]]
name = "raw"
from = ["fleet/+/telemetry/metrics"]
to = ["raw"]

[[rules]]
name = "noisy"
from = ["fleet/+/telemetry/logs"]
throttle = { key = "agent", rate = "5/1h" }
to = ["logs"]
"#;

async fn start(dir: &Path) -> Engine {
    let set = RuleSet::parse(Path::new("rules.toml"), RULES).unwrap();
    let publisher = Publisher::new(|_, _| Ok(()));
    Engine::start(set, dir, EngineOptions::default(), publisher)
        .await
        .unwrap()
}

/// Record `seq` of agent `a1`: two disk metrics and a CPU one; record 50's second disk
/// metric has no labels, so the transform cannot read its mount.
fn metrics(seq: u64) -> Vec<u8> {
    let labels = match seq {
        50 => String::new(),
        _ => r#","labels":{"mount":"/var"}"#.to_string(),
    };
    format!(
        r#"{{"seq":{seq},"epoch":7,"host":"h1","metrics":[{{"name":"disk.used","value":{seq},"labels":{{"mount":"/"}}}},{{"name":"disk.free","value":{seq}.5{labels}}},{{"name":"cpu.usage","value":1.0}}]}}"#
    )
    .into_bytes()
}

fn query(dir: &Path, file: &str, sql: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(dir.join(file)).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_item_becomes_a_row_failures_go_to_on_error_and_throttles_count_only_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path()).await;
    for seq in 1..=100 {
        engine.dispatch("fleet/a1/telemetry/metrics", &metrics(seq));
    }
    // sent again (an agent that missed the acknowledgements): duplicates, nothing made
    for seq in 1..=100 {
        engine.dispatch("fleet/a1/telemetry/metrics", &metrics(seq));
    }
    // agent c: 3 lines, the same 3 again, then 2 more: the 5 new ones pass
    let log = |seq: u64| format!(r#"{{"seq":{seq},"epoch":1,"line":"l{seq}"}}"#).into_bytes();
    for seq in [1, 2, 3, 1, 2, 3, 4, 5, 6, 7] {
        engine.dispatch("fleet/c/telemetry/logs", &log(seq));
    }
    for seq in 1..=20 {
        engine.dispatch("fleet/d/telemetry/logs", &log(seq));
    }
    wait_for(&engine, Duration::from_secs(20), "every sink", |s| {
        s.written("points") == 199
            && s.written("by_metric") == 199
            && s.written("raw") == 100
            && s.written("dead") == 1
            && s.written("logs") == 10
    })
    .await;
    let stats = engine.stats();
    for sink in ["points", "by_metric", "raw", "dead", "logs"] {
        assert_balanced(&stats, sink);
    }
    let rule = |name: &str| stats.rules.iter().find(|r| r.rule == name).unwrap().clone();
    let points = rule("points");
    assert_eq!(
        (
            points.seen,
            points.matched,
            points.filtered,
            points.errors,
            points.produced
        ),
        (100, 200, 100, 1, 199),
        "{points:#?}"
    );
    let noisy = rule("noisy");
    assert_eq!(
        (noisy.seen, noisy.throttled, noisy.produced),
        (27, 17, 10),
        "{noisy:#?}"
    );
    engine.shutdown(Duration::from_secs(5)).await;

    // one row per disk metric, in order, each with the columns of the message made
    let rows = query(
        dir.path(),
        "points.sqlite",
        "SELECT name || '=' || value || '@' || mount || ' ' || agent || '/' || stream \
         || ' ' || coalesce(seq, 'no seq') FROM points ORDER BY rowid",
    );
    assert_eq!(rows.len(), 199);
    assert_eq!(rows[0], "disk.used=1@/ a1/metrics no seq");
    assert_eq!(rows[1], "disk.free=1.5@/var a1/metrics no seq");
    assert_eq!(
        rows[98], "disk.used=50@/ a1/metrics no seq",
        "record 50's good metric is a row"
    );
    assert_eq!(rows[99], "disk.used=51@/ a1/metrics no seq");
    // the records themselves, once each, with their keys
    let raw = query(
        dir.path(),
        "raw.sqlite",
        "SELECT seq || '' FROM messages ORDER BY rowid",
    );
    assert_eq!(raw, (1..=100).map(|s| s.to_string()).collect::<Vec<_>>());
    // record 50 as published, with the reason
    // files named by fields of the messages made (a `/` in a value made safe)
    assert_eq!(
        lines(&dir.path().join("metrics/disk.used/_.jsonl")).len(),
        100
    );
    assert_eq!(
        lines(&dir.path().join("metrics/disk.free/_var.jsonl")).len(),
        99
    );
    let dead = lines(&dir.path().join("dead/h1/a1.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["record"]["seq"], 50);
    assert_eq!(dead[0]["dead_letter"]["sink"], "rule:points");
    let error = dead[0]["dead_letter"]["error"].as_str().unwrap();
    assert!(error.starts_with("set.mount: "), "{error}");
    // five lines per agent: c's first five new ones
    let c: Vec<u64> = lines(&dir.path().join("logs/c.jsonl"))
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(c, [1, 2, 3, 4, 5]);
    assert_eq!(lines(&dir.path().join("logs/d.jsonl")).len(), 5);

    // a crash before the workers saved their positions: the log is read again from the
    // start, and the tables already hold it
    for sink in ["points", "raw"] {
        std::fs::remove_file(dir.path().join(format!("wal/sinks/{sink}.pos"))).unwrap();
    }
    let engine = start(dir.path()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        query(
            dir.path(),
            "points.sqlite",
            "SELECT count(*) || '' FROM points"
        ),
        ["199"]
    );
    assert_eq!(
        query(
            dir.path(),
            "raw.sqlite",
            "SELECT count(*) || '' FROM messages"
        ),
        ["100"]
    );
}

const ROLLUP_RULES: &str = r#"
[sinks.rollups]
type = "sqlite"
path = "rollups.sqlite"
table = "rollups"
columns = { key = "record.key", n = "record.count", total = "record.sum", top = "record.max", partial = "has(record.partial)" }

[sinks.alerts]
type = "file"
path = "alerts/{agent}.jsonl"

[[rules]]
name = "cpu-per-second"
from = ["fleet/+/telemetry/cpu"]
aggregate = { key = "agent", value = "record.value", window = "1s" }
to = ["rollups"]

[[rules]]
name = "one-alert-per-rule"
from = ["fleet/+/telemetry/events"]
dedupe = { key = "record.rule", window = "1h" }
to = ["alerts"]
"#;

/// Samples folded into one-second windows reach a real SQLite table as roll-ups once
/// their windows are over (the engine closes them every second) or at the stop (marked
/// partial): every sample counted once. A repeated event passes its `dedupe` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_windows_reach_a_table_as_roll_ups_and_dedupe_passes_one() {
    let dir = tempfile::tempdir().unwrap();
    let set = RuleSet::parse(Path::new("rules.toml"), ROLLUP_RULES).unwrap();
    let engine = Engine::start(
        set,
        dir.path(),
        EngineOptions::default(),
        Publisher::new(|_, _| Ok(())),
    )
    .await
    .unwrap();
    let mut total = 0.0;
    for seq in 1..=40u64 {
        let value = seq as f64 * 1.5;
        total += value;
        let agent = if seq % 2 == 0 { "a" } else { "b" };
        let body = format!(r#"{{"seq":{seq},"epoch":1,"value":{value}}}"#);
        engine.dispatch(&format!("fleet/{agent}/telemetry/cpu"), body.as_bytes());
        let event = format!(r#"{{"seq":{seq},"epoch":1,"rule":"disk"}}"#);
        engine.dispatch(&format!("fleet/{agent}/telemetry/events"), event.as_bytes());
    }
    // the windows of this second close within about two seconds
    wait_for(&engine, Duration::from_secs(10), "roll-ups", |s| {
        s.written("rollups") >= 2 && s.written("alerts") == 1
    })
    .await;
    let stats = engine.stats();
    let rule = stats
        .rules
        .iter()
        .find(|r| r.rule == "cpu-per-second")
        .unwrap();
    assert_eq!(rule.aggregated, 40, "{rule:#?}");
    let dedupe = stats
        .rules
        .iter()
        .find(|r| r.rule == "one-alert-per-rule")
        .unwrap();
    assert_eq!(
        (dedupe.deduplicated, dedupe.produced),
        (39, 1),
        "{dedupe:#?}"
    );
    engine.shutdown(Duration::from_secs(5)).await;
    let conn = rusqlite::Connection::open(dir.path().join("rollups.sqlite")).unwrap();
    let (n, sum, keys): (i64, f64, String) = conn
        .query_row(
            "SELECT sum(n), sum(total), group_concat(DISTINCT key) FROM rollups",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(n, 40, "every sample counted once");
    assert!((sum - total).abs() < 1e-9, "{sum} against {total}");
    assert!(keys.contains('a') && keys.contains('b'), "{keys}");
    let top: f64 = conn
        .query_row("SELECT max(top) FROM rollups WHERE key = 'a'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(top, 60.0);
    assert_eq!(lines(&dir.path().join("alerts/b.jsonl")).len(), 1);
}
