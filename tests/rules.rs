//! End-to-end: conditions and fan-out, with a third-party client publishing JSON.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const RULES: &str = r#"
[sinks.all]
type = "file"
path = "all/{agent}.jsonl"

[sinks.copy]
type = "file"
path = "copy/{topic.1}-{stream}.jsonl"

[sinks.hot]
type = "file"
path = "hot/%Y.jsonl"

[[rules]]
name = "everything"
from = ["fleet/+/telemetry/#"]
to = ["all", "copy"]

[[rules]]
name = "too-hot"
from = ["fleet/+/telemetry/sensors"]
where = 'has(record.temp) && record.temp > 50.0 && agent == "thermo"'
to = ["hot"]
"#;

/// A rule with a condition routes only the matching records; a rule with two sinks writes
/// every record to both; JSON from a third-party publisher is accepted.
#[test]
fn conditions_select_and_fan_out_writes_every_sink() {
    let fx = Fixture::new();
    let data = &fx.data;
    let mut server = fx.serve(Some(RULES), "server");
    fx.wait_listening();

    let mut opts = MqttOptions::new("third-party", "127.0.0.1", fx.port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 100);
    let temps: Vec<f64> = (0..40).map(|i| (i * 7 % 100) as f64).collect();
    for (i, t) in temps.iter().enumerate() {
        let body = format!(
            r#"{{"seq":{},"ts":"2026-05-01T00:00:00Z","temp":{t}}}"#,
            i + 1
        );
        client
            .publish(
                "fleet/thermo/telemetry/sensors",
                QoS::AtLeastOnce,
                false,
                body,
            )
            .unwrap();
    }
    let mut acked = 0;
    for event in conn.iter() {
        if let Ok(Event::Incoming(Packet::PubAck(_))) = event {
            acked += 1;
            if acked == temps.len() {
                break;
            }
        }
    }
    wait_until(Duration::from_secs(10), "all records in both sinks", || {
        summary(&data.join("all"), "thermo", "sensors").is_some_and(|s| s.records == 40)
            && summary(&data.join("copy"), "thermo", "sensors").is_some_and(|s| s.records == 40)
    });
    assert!(server.terminate(Duration::from_secs(15)).success());

    for sink in ["all", "copy"] {
        let s = summary(&data.join(sink), "thermo", "sensors").unwrap();
        assert!(
            s.is_contiguous() && s.first_seq == 1 && s.last_seq == 40,
            "{sink}: {s:?}"
        );
    }
    assert!(data.join("copy/thermo-sensors.jsonl").exists());
    let hot = records(&data.join("hot"));
    let hot_seqs: Vec<u64> = hot.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = temps
        .iter()
        .enumerate()
        .filter(|(_, t)| **t > 50.0)
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        hot_seqs, expected,
        "only records above 50 degrees, each once, in order"
    );
    assert!(
        data.join("hot/2026.jsonl").exists(),
        "strftime from the record's ts"
    );
    // the topic is authoritative for identity
    assert!(hot
        .iter()
        .all(|r| r["agent"] == "thermo" && r["stream"] == "sensors"));
}

/// `fleetbus rules run` as its own process against a broker (here the embedded one of a
/// `serve` with the built-in rules) writes what the agents publish, like the built-in
/// engine; a forged file completion from the network reaches none of its sinks (it used to
/// stall the sink that tried to copy a file that does not exist).
#[test]
fn standalone_rules_engine_against_a_broker() {
    let fx = Fixture::new();
    let _server = fx.serve(None, "server");
    fx.wait_listening();
    let rules = fx.path().join("standalone.toml");
    std::fs::write(
        &rules,
        "[sinks.out]\ntype = \"file\"\npath = \"{agent}-{stream}.jsonl\"\n\
         [sinks.files]\ntype = \"file\"\npath = \"files/{agent}/{file.name}\"\n\
         [[rules]]\nname = \"hb\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [\"out\"]\n\
         [[rules]]\nname = \"files\"\nfrom = [\"fleet/+/files/+/complete\"]\nto = [\"files\"]\n",
    )
    .unwrap();
    let standalone_data = fx.path().join("standalone-data");
    let mut engine = Proc::start(
        &[
            "rules",
            "run",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", fx.port),
            "--rules",
            rules.to_str().unwrap(),
            "--data-dir",
            standalone_data.to_str().unwrap(),
        ],
        &fx.path().join("engine.log"),
    );
    wait_until(
        Duration::from_secs(10),
        "standalone engine subscribed",
        || engine.log_text().contains("rules engine connected"),
    );
    // a forged completion, published before the agent's records
    let (client, mut connection) = rumqttc::Client::new(
        rumqttc::MqttOptions::new("forger", "127.0.0.1", fx.port),
        10,
    );
    client
        .publish(
            "fleet/st/files/f1/complete",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"file":{"id":"f1","name":"x","size":3},"spool":"st/f1/data"}"#,
        )
        .unwrap();
    for event in connection.iter().take(20) {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
            break;
        }
    }
    let mut agent = fx.agent("st", Some("st"), 50);
    wait_until(
        Duration::from_secs(20),
        "heartbeats through the standalone engine",
        || summary(&standalone_data, "st", "heartbeat").is_some_and(|s| s.records >= 20),
    );
    assert!(!standalone_data.join("files").exists());
    assert!(
        engine.log_text().contains("only the server produces"),
        "{}",
        engine.log_text()
    );
    assert!(agent.terminate(Duration::from_secs(10)).success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(engine.terminate(Duration::from_secs(10)).success());
    let s = summary(&standalone_data, "st", "heartbeat").unwrap();
    assert!(s.is_contiguous() && s.first_seq == 1, "{s:?}");
    // only the rule's filter: no metrics
    assert!(summary(&standalone_data, "st", "metrics").is_none());
}

/// The birth message reaches the rules engine on connect, and the broker publishes the
/// agent's last will when the agent dies without saying goodbye.
#[test]
fn presence_birth_and_last_will_are_routable() {
    let fx = Fixture::new();
    let rules = "[sinks.p]\ntype = \"file\"\npath = \"presence/{topic.1}.jsonl\"\n\
                 [[rules]]\nname = \"presence\"\nfrom = [\"fleet/+/presence\"]\nto = [\"p\"]\n";
    let _server = fx.serve(Some(rules), "server");
    let mut agent = fx.agent("pr", Some("pr"), 1000);
    let file = fx.data.join("presence/pr.jsonl");
    let statuses = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(10), "birth message", || {
        !statuses().is_empty()
    });
    let birth = &statuses()[0];
    assert_eq!(birth["status"], "online");
    assert_eq!(birth["agent"], "pr");
    assert_eq!(birth["groups"][0], "pr-group");
    assert!(birth["agent_version"].is_string() && birth["hostname"].is_string());
    agent.kill();
    wait_until(Duration::from_secs(10), "last will after SIGKILL", || {
        statuses().iter().any(|s| s["status"] == "offline")
    });
}
