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
