//! The InfluxDB sink behind the engine, against a real InfluxDB 1.x (Debian's package,
//! started by the test): every metric one point with its tags and nanosecond time; a point
//! the database refuses (a field type conflict) and a record without metrics go to the
//! dead letter with the reason while the records around them are written; each point
//! tagged with the groups its agent had when the record was accepted; and the whole
//! log written again changes nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_balanced, wait_for};
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;
use fleetbus_testkit::influxdb::Influxd;

async fn start(dir: &Path, influx: &Influxd) -> Engine {
    let rules = format!(
        r#"
[sinks.influx]
type = "influxdb"
url = "{}"
database = "fleet"
create_database = true
dead_letter = "dlq"
batch.max_events = 30

[sinks.dlq]
type = "file"
path = "dead/{{agent}}.jsonl"

[[rules]]
name = "metrics"
from = ["fleet/+/telemetry/#"]
to = ["influx"]
"#,
        influx.url()
    );
    let set = RuleSet::parse(Path::new("rules.toml"), &rules).unwrap();
    Engine::start(set, dir, EngineOptions::default(), Publisher::discard())
        .await
        .unwrap()
}

/// Record `seq` of agent `a1` at 10:00:00 + `seq` ms: `cpu.usage` = seq, but record 50 has
/// only `disk.used` (whose `value` the database holds as a string) and record 60 no
/// metrics at all.
fn record(seq: u64) -> String {
    let metrics = match seq {
        50 => r#""metrics":[{"name":"disk.used","value":91.0,"labels":{"mount":"/"}}]"#.into(),
        60 => r#""text":"no metrics""#.to_string(),
        _ => format!(
            r#""metrics":[{{"name":"cpu.usage","value":{seq},"labels":{{"cpu":"total"}}}}]"#
        ),
    };
    format!(
        r#"{{"seq":{seq},"epoch":7,"ts":"2026-12-01T10:00:00.{seq:03}000001Z","tags":{{"role":"web"}},{metrics}}}"#
    )
}

/// (time, value, agent, cpu, groups, role, stream) of every `cpu.usage` point, in time
/// order.
fn cpu_points(influx: &Influxd) -> Vec<serde_json::Value> {
    let answer = influx
        .query(
            Some("fleet"),
            r#"SELECT "value", "agent", "cpu", "groups", "role", "stream" FROM "cpu.usage""#,
        )
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    answer["results"][0]["series"][0]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_arrive_refused_ones_are_dead_lettered_and_a_replay_changes_nothing() {
    let Some(influx) = Influxd::start().unwrap() else {
        return;
    };
    influx.query(None, "CREATE DATABASE fleet").unwrap();
    // field types are fixed per shard (a week of time): this one shares the records'
    influx
        .write(
            "fleet",
            "disk.used,agent=other value=\"full\" 1796115600000000000\n",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path(), &influx).await;
    // the agent's groups when each record is accepted: its records carry them
    engine.set_agent_groups("a1", &["web".into(), "linux".into()]);
    for seq in 1..=100 {
        if seq == 71 {
            engine.set_agent_groups("a1", &["db".into()]);
        }
        engine.dispatch("fleet/a1/telemetry/metrics", record(seq).as_bytes());
    }
    wait_for(
        &engine,
        Duration::from_secs(30),
        "the points and the dead letters",
        |s| s.written("influx") == 98 && s.written("dlq") == 2,
    )
    .await;
    let (routed, written, dead) = assert_balanced(&engine.stats(), "influx");
    assert_eq!((routed, written, dead), (100, 98, 2));

    let points = cpu_points(&influx);
    let want: Vec<serde_json::Value> = (1..=100u64)
        .filter(|s| *s != 50 && *s != 60)
        .map(|seq| {
            serde_json::json!([
                format!("2026-12-01T10:00:00.{seq:03}000001Z"),
                seq,
                "a1",
                "total",
                if seq <= 70 { "linux,web" } else { "db" },
                "web",
                "metrics"
            ])
        })
        .collect();
    assert_eq!(points, want);

    let dead = std::fs::read_to_string(dir.path().join("dead/a1.jsonl")).unwrap();
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let error = |seq: u64| {
        let d = dead.iter().find(|d| d["record"]["seq"] == seq).unwrap();
        assert_eq!(d["dead_letter"]["sink"], "influx");
        d["dead_letter"]["error"].as_str().unwrap().to_string()
    };
    assert!(error(50).contains("field type conflict"), "{}", error(50));
    assert!(
        error(60).contains("only metric records become points"),
        "{}",
        error(60)
    );
    engine.shutdown(Duration::from_secs(5)).await;
    drop(engine);

    // the whole log again, from its first entry: every point replaces itself, with the
    // groups it was accepted with (this engine knows none)
    std::fs::remove_file(dir.path().join("wal/sinks/influx.pos")).unwrap();
    let engine = start(dir.path(), &influx).await;
    wait_for(&engine, Duration::from_secs(30), "the replay", |s| {
        let (_, influx) = s.sinks.iter().find(|(n, _)| n == "influx").unwrap();
        influx.written + influx.dead_lettered == 100
    })
    .await;
    assert_eq!(cpu_points(&influx), want);
    engine.shutdown(Duration::from_secs(5)).await;
}
