//! The engine with real file sinks: one sink failing (and slow, because it keeps retrying)
//! does not hold up the others, and its losses are counted.

use std::path::Path;
use std::time::{Duration, Instant};

use fleetbus_rules::{Engine, RuleSet};

const RULES: &str = r#"
[sinks.good]
type = "file"
path = "good/{agent}.jsonl"

[sinks.broken]
type = "file"
path = "blocker/{agent}.jsonl"
buffer.max_events = 10
batch.max_events = 5
batch.max_attempts = 3
batch.retry_backoff = "300ms"

[[rules]]
name = "both"
from = ["fleet/+/telemetry/#"]
to = ["good", "broken"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // a regular file where the broken sink needs a directory
    std::fs::write(dir.path().join("blocker"), "not a directory").unwrap();
    let set = RuleSet::parse(Path::new("rules.toml"), RULES).unwrap();
    let engine = Engine::start(set, dir.path()).unwrap();
    for seq in 1..=500u64 {
        let body = format!(r#"{{"seq":{seq}}}"#);
        engine.dispatch("fleet/a1/telemetry/app", body.as_bytes());
    }
    let started = Instant::now();
    let good = loop {
        let stats = engine.stats();
        let good = stats
            .sinks
            .iter()
            .find(|(n, _)| n == "good")
            .unwrap()
            .1
            .clone();
        if good.written == 500 || started.elapsed() > Duration::from_secs(5) {
            break good;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(good.written, 500, "the good sink was held up: {good:?}");
    assert_eq!(good.dropped_queue_full + good.dropped_failed, 0);

    let stats = engine.stats();
    let broken = stats
        .sinks
        .iter()
        .find(|(n, _)| n == "broken")
        .unwrap()
        .1
        .clone();
    assert!(broken.dropped_queue_full > 0, "{broken:?}");
    assert!(broken.failed_attempts > 0, "{broken:?}");
    assert_eq!(broken.written, 0);
    let err = broken.last_error.unwrap();
    assert!(
        err.contains("blocker"),
        "the error must name the path: {err}"
    );
    assert_eq!(stats.received, 500);
    assert_eq!(stats.rules[0], ("both".to_string(), 500, 0));

    engine.shutdown(Duration::from_secs(5)).await;
    let lines = std::fs::read_to_string(dir.path().join("good/a1.jsonl")).unwrap();
    let seqs: Vec<u64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
}

#[tokio::test]
async fn undecodable_payloads_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let set = RuleSet::parse(Path::new("rules.toml"), RULES).unwrap();
    let engine = Engine::start(set, dir.path()).unwrap();
    engine.dispatch("fleet/a1/telemetry/app", b"\xc1 not msgpack");
    engine.dispatch("fleet/a1/telemetry/app", b"");
    engine.dispatch("other/topic", b"{}");
    let stats = engine.stats();
    assert_eq!(
        (stats.received, stats.decode_errors, stats.unrouted),
        (3, 2, 1)
    );
    engine.shutdown(Duration::from_secs(5)).await;
}
