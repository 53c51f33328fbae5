//! The heartbeat collector: one small record per interval on the `heartbeat` stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::outbox::Outbox;

/// Stream the heartbeat collector writes to.
pub const HEARTBEAT_STREAM: &str = "heartbeat";

/// Pushes a heartbeat record every `interval` until `shutdown` turns true, or until `limit`
/// records were pushed (0 = no limit).
pub async fn run_heartbeat(
    outbox: Arc<Outbox>,
    interval: Duration,
    limit: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pushed = 0u64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        match outbox.push(HEARTBEAT_STREAM, |_| {}) {
            Ok(_) => pushed += 1,
            Err(e) => tracing::error!(error = %e, "heartbeat record not stored"),
        }
        if limit > 0 && pushed >= limit {
            tracing::info!(pushed, "heartbeat limit reached");
            // keep the task alive: the agent runs until it is asked to stop
            crate::stopped(&mut shutdown).await;
            return;
        }
    }
}
