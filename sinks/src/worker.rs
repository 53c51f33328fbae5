//! The sink worker: one task per sink, fed by its own bounded queue. It groups queued
//! messages into batches, retries failed writes with backoff and jitter, flushes on an
//! interval, and keeps counters. A full queue drops new messages *for this sink only*
//! (counted and logged), so a slow or dead sink never stops the others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetbus_protocol::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{BatchConfig, Sink};

/// Live counters of one sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Messages accepted into the queue.
    pub accepted: AtomicU64,
    /// Messages written.
    pub written: AtomicU64,
    /// Failed write attempts (each retried batch counts once per failure).
    pub failed_attempts: AtomicU64,
    /// Messages refused because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Messages given up after `max_attempts` failed writes.
    pub dropped_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of a sink's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStatsSnapshot {
    /// See [`SinkStats::accepted`].
    pub accepted: u64,
    /// See [`SinkStats::written`].
    pub written: u64,
    /// See [`SinkStats::failed_attempts`].
    pub failed_attempts: u64,
    /// See [`SinkStats::dropped_queue_full`].
    pub dropped_queue_full: u64,
    /// See [`SinkStats::dropped_failed`].
    pub dropped_failed: u64,
    /// The most recent write error, if any.
    pub last_error: Option<String>,
}

impl SinkStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> SinkStatsSnapshot {
        SinkStatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
            dropped_failed: self.dropped_failed.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// The sending side of a running sink.
pub struct SinkHandle {
    name: String,
    tx: Option<mpsc::Sender<Arc<Message>>>,
    stats: Arc<SinkStats>,
    task: JoinHandle<()>,
}

impl SinkHandle {
    /// The sink's name (its key under `[sinks]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues `msg` for the sink without waiting. Returns false (and counts the drop) if
    /// the queue is full or the sink has stopped.
    pub fn offer(&self, msg: Arc<Message>) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(msg) {
            Ok(()) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                let n = self
                    .stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n.is_power_of_two() {
                    tracing::error!(sink = %self.name, dropped_total = n, "sink queue full: message dropped for this sink (it is too slow or failing)");
                }
                false
            }
        }
    }

    /// The sink's counters.
    pub fn stats(&self) -> &Arc<SinkStats> {
        &self.stats
    }

    /// Stops accepting, lets the worker write what is queued and flush, waiting at most
    /// `deadline`. Returns false if the deadline passed first.
    pub async fn close(mut self, deadline: Duration) -> bool {
        self.tx = None;
        match tokio::time::timeout(deadline, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                tracing::error!(sink = %self.name, "sink did not finish within the shutdown deadline");
                self.task.abort();
                false
            }
        }
    }
}

/// Starts the worker task of sink `name` with a queue of `queue` messages.
pub fn spawn_sink(name: &str, sink: Box<dyn Sink>, queue: usize, batch: BatchConfig) -> SinkHandle {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let stats = Arc::new(SinkStats::default());
    let span = tracing::info_span!("sink", sink = %name);
    let task = tokio::spawn(run_worker(sink, rx, stats.clone(), batch).instrument(span));
    SinkHandle {
        name: name.to_string(),
        tx: Some(tx),
        stats,
        task,
    }
}

async fn run_worker(
    mut sink: Box<dyn Sink>,
    mut rx: mpsc::Receiver<Arc<Message>>,
    stats: Arc<SinkStats>,
    config: BatchConfig,
) {
    let mut batch: Vec<Arc<Message>> = Vec::with_capacity(config.max_events);
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        let until_flush = config.flush_interval.saturating_sub(last_flush.elapsed());
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::time::sleep(until_flush), if dirty => {
                flush(&mut *sink, &stats).await;
                dirty = false;
                last_flush = Instant::now();
                continue;
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < config.max_events {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        deliver(&mut *sink, &batch, &stats, &config).await;
        batch.clear();
        dirty = true;
        if rx.is_empty() || last_flush.elapsed() >= config.flush_interval {
            flush(&mut *sink, &stats).await;
            dirty = false;
            last_flush = Instant::now();
        }
    }
    flush(&mut *sink, &stats).await;
}

async fn deliver(
    sink: &mut dyn Sink,
    batch: &[Arc<Message>],
    stats: &SinkStats,
    config: &BatchConfig,
) {
    let mut done = 0;
    let mut attempt = 0;
    let mut delay = config.retry_backoff;
    while done < batch.len() {
        match sink.write(&batch[done..]).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add((batch.len() - done) as u64, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                let written = e.written.min(batch.len() - done);
                done += written;
                stats.written.fetch_add(written as u64, Ordering::Relaxed);
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                stats.set_error(e.to_string());
                attempt += 1;
                if attempt >= config.max_attempts {
                    let lost = (batch.len() - done) as u64;
                    stats.dropped_failed.fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(error = %e, attempts = attempt, dropped = lost, "sink write failed; batch given up");
                    return;
                }
                let wait = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
                tracing::warn!(error = %e, attempt, retry_in = ?wait, "sink write failed; retrying");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn flush(sink: &mut dyn Sink, stats: &SinkStats) {
    if let Err(e) = sink.flush().await {
        stats.set_error(e.to_string());
        tracing::error!(error = %e, "sink flush failed (will retry at the next flush)");
    }
}
