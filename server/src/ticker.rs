//! Periodic wake-ups for the service threads (file service, job service).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Sends `make()` into `tx` every `period` (skipped while the queue is full: a tick is only
/// a reminder) until the receiver is gone.
pub(crate) fn spawn<T: Send + 'static>(
    tx: mpsc::Sender<T>,
    period: Duration,
    make: fn() -> T,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        loop {
            every.tick().await;
            if tx.try_send(make()).is_err() && tx.is_closed() {
                return;
            }
        }
    })
}
