use std::sync::{Arc, Mutex};

use fleetbus_protocol::Message;
use fleetbus_support::NotPublished;

use super::*;
use crate::{ErrorClass, Item};

fn config(text: &str) -> MqttSinkConfig {
    toml::from_str(text).unwrap()
}

fn problems(text: &str) -> Vec<String> {
    let mut p = Problems::new();
    config(text).check(&mut p);
    p.into_vec().iter().map(|p| p.to_string()).collect()
}

/// Heartbeats of agent `web-1` with the given payload sizes (log index = position + 10).
fn batch(sizes: &[usize]) -> Batch {
    let items = sizes
        .iter()
        .enumerate()
        .map(|(n, size)| {
            Item::new(
                10 + n as u64,
                Message::decode(
                    "fleet/web-1/telemetry/heartbeat",
                    format!(
                        r#"{{"seq":{n},"epoch":1,"ts":"2026-12-01T00:00:00Z","pad":"{}"}}"#,
                        "x".repeat(*size)
                    )
                    .as_bytes(),
                )
                .unwrap(),
            )
        })
        .collect();
    Batch {
        first: 10,
        next: 10 + sizes.len() as u64,
        items,
    }
}

/// What a publisher was handed: topic, seq of the payload, retain.
type Published = Arc<Mutex<Vec<(String, u64, bool)>>>;

/// A publisher that records, and refuses every call numbered in `refuse` (1-based).
fn recording(refuse: &'static [usize]) -> (Publisher, Published) {
    let seen: Published = Arc::default();
    let calls = Arc::new(Mutex::new(0));
    let record = seen.clone();
    let publisher = Publisher::with_retain(move |topic, payload, retain| {
        let mut calls = calls.lock().unwrap();
        *calls += 1;
        if refuse.contains(&calls) {
            return Err(NotPublished("router queue full".into()));
        }
        let body: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        record
            .lock()
            .unwrap()
            .push((topic, body["seq"].as_u64().unwrap(), retain));
        Ok(())
    });
    (publisher, seen)
}

fn own_sink(publisher: &Publisher) -> Box<dyn Sink> {
    let dir = std::env::temp_dir();
    config("topic = \"alerts/{agent}/{stream}\"\nretain = true\n")
        .build(&SinkPlace {
            name: "alerts",
            data_dir: &dir,
            state_dir: &dir,
            broker: publisher,
        })
        .unwrap()
}

#[test]
fn every_problem_is_reported_at_its_key() {
    let shown = problems(
        "topic = \"fleet/{agent}/again\"\nqos = 2\nusername = \"u\"\nca_file = \"/x.pem\"\ntimeout = \"1ms\"\n",
    );
    let expected = [
        "topic: `fleet/{agent}/again`: `fleet/...` is the fleet's own namespace",
        "qos: must be 0 or 1",
        "timeout: must be between 100ms and 300s",
        "username: is for another broker (`url`)",
        "ca_file: is for another broker (`url`)",
    ];
    assert_eq!(shown.len(), expected.len(), "{shown:#?}");
    for (got, want) in shown.iter().zip(expected) {
        assert!(got.starts_with(want), "{got}\n  expected {want}");
    }
    let shown = problems("topic = \"{agent}/x/+\"\n");
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(shown[0].contains("`+`, `#` and NUL"), "{shown:#?}");
    assert!(
        shown[1].contains("first level must be fixed text"),
        "{shown:#?}"
    );
    assert!(problems("topic = \"$SYS/x\"\nurl = \"mqtt://h\"\n")[0].contains("`$` topics"));
    let shown = problems(
        "topic = \"{agent}/x\"\nurl = \"mqtt://h\"\nca_file = \"/x.pem\"\npassword = { env = \"FLEETBUS_TEST_NEVER_SET_4711\" }\n",
    );
    let expected = [
        "ca_file: is for mqtts:// or wss://, not `mqtt://h:1883`",
        "ca_file: ca_file /x.pem:",
        "password: needs a `username`",
        "password: environment variable FLEETBUS_TEST_NEVER_SET_4711 is not set",
    ];
    assert_eq!(shown.len(), expected.len(), "{shown:#?}");
    for (got, want) in shown.iter().zip(expected) {
        assert!(got.contains(want), "{got}\n  expected {want}");
    }
    assert!(problems("topic = \"x\"\nurl = \"http://h\"\n")[0].starts_with("url: `http://h`"));
    // the fleet's namespace is the server's own broker's: bridging it elsewhere is fine
    assert!(problems("topic = \"fleet/{agent}/x\"\nurl = \"mqtts://central:8883\"\n").is_empty());
}

#[test]
fn the_filter_of_republished_topics_widens_each_placeholder() {
    let filter = |text: &str| config(text).republished_filter();
    assert_eq!(
        filter("topic = \"alerts/{agent}/{stream}\"").as_deref(),
        Some("alerts/+/+")
    );
    assert_eq!(
        filter("topic = \"roll/x-{agent}/%Y/%m/{stream}\"").as_deref(),
        Some("roll/+/#")
    );
    assert_eq!(filter("topic = \"a/b\"").as_deref(), Some("a/b"));
    assert_eq!(filter("topic = \"a/b\"\nurl = \"mqtt://h\""), None);
}

#[tokio::test]
async fn into_its_own_broker_every_message_goes_once_in_order_with_its_retain_flag() {
    // the router's queue is full at the 3rd call: the retry goes on from that message
    let (publisher, seen) = recording(&[3]);
    let mut sink = own_sink(&publisher);
    let batch = batch(&[1, 1, 1, 1]);
    let e = sink.write(&batch).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert_eq!(seen.lock().unwrap().len(), 2);
    sink.write(&batch).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let want: Vec<(String, u64, bool)> = (0..4)
        .map(|n| ("alerts/web-1/heartbeat".to_string(), n, true))
        .collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn a_message_too_large_for_mqtt_goes_to_the_dead_letter_before_anything_is_sent() {
    let (publisher, seen) = recording(&[]);
    let mut sink = own_sink(&publisher);
    let e = sink
        .write(&batch(&[1, MAX_MESSAGE_BYTES, 1]))
        .await
        .unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[1][..]), "{e}");
    assert!(e.to_string().contains("larger than an MQTT message"), "{e}");
    assert!(seen.lock().unwrap().is_empty());
}
