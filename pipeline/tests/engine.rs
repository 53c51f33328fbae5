//! The durable record path with real files: write-ahead log, group commit and
//! acknowledgements, de-duplication, dead letters, backpressure, replay after a restart.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{lines, wait_for};
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_protocol::Ack;
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;

/// Every acknowledgement published, decoded: (agent, stream, seq).
#[derive(Clone, Default)]
struct AckLog(Arc<Mutex<Vec<(String, String, u64)>>>);

impl AckLog {
    fn publisher(&self) -> Publisher {
        let log = self.0.clone();
        Publisher::new(move |topic, payload| {
            // fleet/{agent}/acks
            let agent = topic.split('/').nth(1).unwrap();
            let ack = Ack::decode(&payload).unwrap();
            let mut log = log.lock().unwrap();
            for (stream, sa) in ack.streams {
                for (lo, hi) in sa.ranges {
                    for seq in lo..=hi {
                        log.push((agent.to_string(), stream.clone(), seq));
                    }
                }
            }
            Ok(())
        })
    }

    fn seqs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.0.lock().unwrap().iter().map(|(_, _, s)| *s).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

async fn start(rules: &str, dir: &Path, acks: &AckLog) -> Engine {
    let set = RuleSet::parse(Path::new("rules.toml"), rules).unwrap();
    Engine::start(set, dir, EngineOptions::default(), acks.publisher())
        .await
        .unwrap()
}

fn record(seq: u64) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"ts":"2026-01-01T00:00:00Z","epoch":7}}"#).into_bytes()
}

const DEAD_LETTER_RULES: &str = r#"
[sinks.good]
type = "file"
path = "good/{agent}.jsonl"

[sinks.broken]
type = "file"
path = "blocker/{agent}.jsonl"
dead_letter = "dlq"
batch.max_events = 100
batch.max_attempts = 2
batch.retry_backoff = "10ms"

[sinks.dlq]
type = "file"
path = "dead/{agent}.jsonl"

[[rules]]
name = "both"
from = ["fleet/+/telemetry/#"]
to = ["good", "broken"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_hands_its_batches_to_the_dead_letter_sink_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("blocker"),
        "a file where the sink needs a directory",
    )
    .unwrap();
    let acks = AckLog::default();
    let engine = start(DEAD_LETTER_RULES, dir.path(), &acks).await;
    for seq in 1..=500 {
        engine.dispatch("fleet/a1/telemetry/app", &record(seq));
    }
    wait_for(
        &engine,
        Duration::from_secs(10),
        "good and dead-letter sinks",
        |s| s.written("good") == 500 && s.written("dlq") == 500,
    )
    .await;
    let stats = engine.stats();
    let broken = &stats.sinks.iter().find(|(n, _)| n == "broken").unwrap().1;
    assert_eq!(broken.written, 0);
    assert_eq!(broken.dead_lettered, 500);
    assert!(broken.failed_attempts >= 10, "{broken:?}");
    assert_eq!(
        acks.seqs(),
        (1..=500).collect::<Vec<_>>(),
        "every record acknowledged once stored"
    );
    engine.shutdown(Duration::from_secs(5)).await;

    let good: Vec<u64> = lines(&dir.path().join("good/a1.jsonl"))
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(good, (1..=500).collect::<Vec<_>>());
    let dead = lines(&dir.path().join("dead/a1.jsonl"));
    assert_eq!(dead.len(), 500);
    assert_eq!(dead[0]["dead_letter"]["sink"], "broken");
    assert_eq!(dead[0]["dead_letter"]["attempts"], 2);
    assert!(
        dead[0]["dead_letter"]["error"]
            .as_str()
            .unwrap()
            .contains("blocker"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[0]["record"]["seq"], 1);
    assert_eq!(dead[499]["record"]["seq"], 500);
}

const ONE_SINK: &str = r#"
[sinks.out]
type = "file"
path = "out/{agent}.jsonl"
buffer.max_bytes = 1048576

[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["out"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_acknowledged_but_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let acks = AckLog::default();
    let engine = start(ONE_SINK, dir.path(), &acks).await;
    for seq in [1, 2, 3, 2, 3, 4, 1] {
        engine.dispatch("fleet/a1/telemetry/app", &record(seq));
    }
    wait_for(&engine, Duration::from_secs(10), "four records", |s| {
        s.written("out") == 4 && s.duplicates == 3
    })
    .await;
    assert_eq!(acks.seqs(), vec![1, 2, 3, 4]);
    engine.shutdown(Duration::from_secs(5)).await;
    let seqs: Vec<u64> = lines(&dir.path().join("out/a1.jsonl"))
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
}

/// Records refused under backpressure leave gaps in a stream; hundreds of them must never
/// make a record that fills one look like a duplicate (acknowledged, never stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_filling_hundreds_of_gaps_are_stored_not_taken_for_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let acks = AckLog::default();
    let engine = start(ONE_SINK, dir.path(), &acks).await;
    // every other record first (600 gaps), then the missing ones
    for seq in (1..=1200).step_by(2) {
        engine.dispatch("fleet/a1/telemetry/app", &record(seq));
    }
    for seq in (2..=1200).step_by(2) {
        engine.dispatch("fleet/a1/telemetry/app", &record(seq));
    }
    wait_for(&engine, Duration::from_secs(10), "all 1200 records", |s| {
        s.written("out") == 1200
    })
    .await;
    assert_eq!(engine.stats().duplicates, 0);
    assert_eq!(acks.seqs(), (1..=1200).collect::<Vec<_>>());
    engine.shutdown(Duration::from_secs(5)).await;
    let mut seqs: Vec<u64> = lines(&dir.path().join("out/a1.jsonl"))
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_what_a_sink_could_not_write_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("out");
    std::fs::write(&blocker, "blocks the sink's directory").unwrap();
    let acks = AckLog::default();
    let engine = start(ONE_SINK, dir.path(), &acks).await;
    for seq in 1..=50 {
        engine.dispatch("fleet/a1/telemetry/app", &record(seq));
    }
    // acknowledged as soon as they are in the log, although the sink cannot write them
    let started = Instant::now();
    while acks.seqs().len() < 50 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(engine.stats().written("out"), 0);
    engine.shutdown(Duration::from_millis(300)).await;

    // the destination comes back; a new engine finds the records in the log
    std::fs::remove_file(&blocker).unwrap();
    let acks2 = AckLog::default();
    let engine = start(ONE_SINK, dir.path(), &acks2).await;
    wait_for(&engine, Duration::from_secs(10), "replayed records", |s| {
        s.written("out") == 50
    })
    .await;
    // the de-duplication state survived too: a re-sent record is not stored again
    engine.dispatch("fleet/a1/telemetry/app", &record(7));
    wait_for(&engine, Duration::from_secs(10), "duplicate", |s| {
        s.duplicates == 1
    })
    .await;
    engine.shutdown(Duration::from_secs(5)).await;
    let seqs: Vec<u64> = lines(&dir.path().join("out/a1.jsonl"))
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sink_backlog_refuses_records_instead_of_dropping_them() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("out");
    std::fs::write(&blocker, "blocks the sink's directory").unwrap();
    let acks = AckLog::default();
    let engine = start(ONE_SINK, dir.path(), &acks).await;
    let pad = "x".repeat(10_000);
    for seq in 1..=300u64 {
        let body = format!(r#"{{"seq":{seq},"epoch":7,"pad":"{pad}"}}"#);
        engine.dispatch("fleet/a1/telemetry/app", body.as_bytes());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = engine.stats();
    assert!(stats.refused > 0, "{stats:#?}");
    let acked = acks.seqs();
    assert_eq!(
        acked.len() as u64 + stats.refused,
        300,
        "every record is either stored and acknowledged, or refused"
    );
    assert!(
        !acked.contains(&300),
        "a refused record must not be acknowledged"
    );
    engine.shutdown(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn undecodable_payloads_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(ONE_SINK, dir.path(), &AckLog::default()).await;
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
