//! The heartbeat collector: one small record per interval on the `heartbeat` stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::outbox::Outbox;

/// Stream the heartbeat collector writes to.
pub const HEARTBEAT_STREAM: &str = "heartbeat";

/// Pushes a heartbeat record every `interval` until `shutdown` turns true.
pub async fn run_heartbeat(
    outbox: Arc<Outbox>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        if let Err(e) = outbox.push(HEARTBEAT_STREAM, |_| {}) {
            tracing::error!(error = %e, "heartbeat record not stored");
        }
    }
}
