//! Periodic wake-ups for the service threads (file service, job service).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::shutdown::StopSignal;

/// Sends `make()` into `tx` every `period` (skipped while the queue is full: a tick is only
/// a reminder) until the stop signal or until the receiver is gone. Its end drops `tx`,
/// one of the holders whose going ends the service's queue.
pub(crate) fn spawn<T: Send + 'static>(
    tx: mpsc::Sender<T>,
    period: Duration,
    make: fn() -> T,
    mut stop: StopSignal,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.stopped() => return,
            }
            if tx.try_send(make()).is_err() && tx.is_closed() {
                return;
            }
        }
    })
}
