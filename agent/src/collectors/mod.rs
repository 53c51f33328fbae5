//! Collectors produce records into the outbox on their own schedule.

mod heartbeat;
mod system;

pub use heartbeat::run_heartbeat;
pub use system::{collect_system_metrics, run_system_metrics};

use std::time::Duration;

use rand::Rng;

/// `interval` shifted at random by up to ±`fraction` of itself.
pub(crate) fn jittered(interval: Duration, fraction: f64) -> Duration {
    let f = rand::rng().random_range(-fraction..=fraction);
    interval.mul_f64((1.0 + f).max(0.0))
}

/// A random part of `interval`: the delay before the first collection, so that agents
/// started together do not sample in step.
pub(crate) fn initial_spread(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.0..1.0))
}
