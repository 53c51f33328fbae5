//! What the pipeline's integration tests share.

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
