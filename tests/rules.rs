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
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let mut server = Proc::start(
        &[
            "serve",
            "--config",
            server_config(dir.path(), port, Some(RULES))
                .to_str()
                .unwrap(),
        ],
        &dir.path().join("server.log"),
    );
    wait_until(Duration::from_secs(10), "server listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let mut opts = MqttOptions::new("third-party", "127.0.0.1", port);
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
