//! What the pipeline's integration tests share.

// each test binary uses some of these
#![allow(dead_code)]

use std::time::{Duration, Instant};

use fleetbus_pipeline::{Engine, EngineStats};

/// Waits until `cond` holds for the engine's counters; fails with `what` and the counters
/// after `deadline`.
pub async fn wait_for(
    engine: &Engine,
    deadline: Duration,
    what: &str,
    cond: impl Fn(&EngineStats) -> bool,
) {
    let started = Instant::now();
    while !cond(&engine.stats()) {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}: {:#?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that sink `name`'s message counters balance with nothing pending: every message
/// routed to it was written, dead-lettered, dropped or skipped as undecodable; returns
/// (routed, written, dead-lettered).
pub fn assert_balanced(stats: &EngineStats, name: &str) -> (u64, u64, u64) {
    let s = &stats
        .sinks
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no sink {name}: {stats:#?}"))
        .1;
    assert_eq!(s.pending, 0, "{name}: {s:#?}");
    assert_eq!(
        s.routed,
        s.written + s.dead_lettered + s.dropped + s.undecodable,
        "{name}: {s:#?}"
    );
    (s.routed, s.written, s.dead_lettered)
}

/// The SQL sinks' shared run: records 1 to 500 of `a1`, one of which the table refuses.
/// Waits (up to `within`) until sink `db` wrote 499 and sink `dlq` took the refused one,
/// checks that both balance, and stops the engine.
pub async fn write_500_one_refused(engine: &Engine, within: Duration) {
    dispatch_records(engine, 1..=500);
    wait_for(engine, within, "the table and the dead letter", |s| {
        s.written("db") == 499 && s.written("dlq") == 1
    })
    .await;
    let stats = engine.stats();
    assert_eq!(assert_balanced(&stats, "db"), (500, 499, 1));
    assert_eq!(assert_balanced(&stats, "dlq"), (1, 1, 0));
    engine.shutdown(Duration::from_secs(5)).await;
}

/// Dispatches records `seqs` of agent `a1` on stream `app` (epoch 7).
pub fn dispatch_records(engine: &Engine, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        let record = format!(r#"{{"seq":{seq},"ts":"2026-01-01T00:00:00Z","epoch":7}}"#);
        engine.dispatch("fleet/a1/telemetry/app", record.as_bytes());
    }
}

/// The one dead letter of agent `a1` in the file sink at `dir/dead/a1.jsonl`: asserts it
/// holds record `seq`, given up by sink `sink`; returns the error it carries.
pub fn the_dead_letter(dir: &std::path::Path, seq: u64, sink: &str) -> String {
    let dead = std::fs::read_to_string(dir.join("dead/a1.jsonl")).unwrap();
    let dead: serde_json::Value = serde_json::from_str(dead.trim()).unwrap();
    assert_eq!(dead["record"]["seq"], seq);
    assert_eq!(dead["dead_letter"]["sink"], sink);
    dead["dead_letter"]["error"].as_str().unwrap().to_string()
}

/// Every line of the JSON-lines file at `path`, parsed (none when there is no file).
pub fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
