//! The sink worker: one task per sink that reads the write-ahead log from the sink's saved
//! position, at its own pace, so a slow or failing sink never holds up the others.
//!
//! It reads only durable entries, groups the ones routed to its sink into batches, retries
//! a failed batch with exponential backoff and jitter, and after `batch.max_attempts` or
//! `batch.max_retry_age` hands the batch to the sink's `dead_letter` sink (with the error).
//! Without a dead-letter sink a batch is retried until it is written. After a written
//! batch the resume position is saved: at once when the log holds nothing more for the
//! sink, and every [`BUSY_SAVE_INTERVAL`] while batches follow each other (an exactly-once
//! sink records its batches itself: its position is saved every [`SAVE_INTERVAL`]).
//!
//! One write is in flight at a time, in log order. While it is, the next batch's entries
//! are read and made ready (decoded, and for a sink that writes JSON rendered) on a
//! blocking thread, so the destination and the log work at once instead of taking turns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use fleetbus_protocol::Message;
use fleetbus_wal::{DeadLetter, Wal, WalEntry};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::position::PositionFile;
use crate::tail::TailCache;
use fleetbus_sinks::{Batch, BatchConfig, ErrorClass, Item, Sink, SinkError};

/// How often the position of an exactly-once sink is saved (and of any sink while the
/// worker only skips entries of other sinks).
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// How often the position of an at-least-once sink is saved while its batches follow each
/// other: a crash then sends again at most the batches written in this time and the one in
/// flight. Saving (two fsyncs) after every batch of a webhook took a third of its
/// throughput (docs/benchmarks.md).
const BUSY_SAVE_INTERVAL: Duration = Duration::from_millis(100);

/// How often a lingering batch (see `batch.max_age`) is looked at again.
const LINGER_STEP: Duration = Duration::from_millis(50);

/// The last saved position and when it was saved.
struct Saved {
    at: u64,
    when: Instant,
    /// After a failed save (a full disk), no new attempt before this.
    retry_at: Option<Instant>,
}

/// How long after a failed position save the next attempt waits.
const SAVE_RETRY: Duration = Duration::from_secs(1);

/// How a batch left the worker.
enum Delivery {
    /// The sink wrote it.
    Written,
    /// It went to the dead-letter sink.
    DeadLettered,
    /// The worker was asked to stop before the batch was written.
    Stopped,
}

/// Where a worker hands batches it gives up on: appends them to the write-ahead log as
/// dead letters routed to sink `target`.
pub trait DeadLetters: Send + Sync {
    /// Appends `entries` (already marked as dead letters for `target`).
    fn append(&self, target: &str, entries: Vec<WalEntry>) -> Result<(), String>;
}

/// Live counters of one sink.
#[derive(Debug, Default)]
///
/// The message counters balance: every message routed to the sink since the start
/// (`routed`, which includes the backlog found in the log at start) is `written`,
/// `dead_lettered`, `dropped`, `undecodable` or still `pending`.
pub struct SinkStats {
    /// Messages routed to the sink since the start, the log's backlog for it included.
    pub routed: AtomicU64,
    /// Of those, messages not yet written, dead-lettered, dropped or skipped.
    pub pending: AtomicU64,
    /// Messages written.
    pub written: AtomicU64,
    /// Failed write attempts.
    pub failed_attempts: AtomicU64,
    /// Messages handed to the dead-letter sink.
    pub dead_lettered: AtomicU64,
    /// Of those, messages that could never be written (moved at once, not retried).
    pub rejected: AtomicU64,
    /// Dead letters the built-in dead-letter sink could not write anywhere (dropped).
    pub dropped: AtomicU64,
    /// Log entries that could not be decoded (skipped, logged).
    pub undecodable: AtomicU64,
    /// The saved resume position: log entries below it are done for this sink.
    pub position: AtomicU64,
    /// Bytes of log entries routed to this sink and not yet written (backpressure).
    pub pending_bytes: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of a sink's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStatsSnapshot {
    /// See [`SinkStats::routed`].
    pub routed: u64,
    /// See [`SinkStats::pending`].
    pub pending: u64,
    /// See [`SinkStats::written`].
    pub written: u64,
    /// See [`SinkStats::failed_attempts`].
    pub failed_attempts: u64,
    /// See [`SinkStats::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`SinkStats::rejected`].
    pub rejected: u64,
    /// See [`SinkStats::dropped`].
    pub dropped: u64,
    /// See [`SinkStats::undecodable`].
    pub undecodable: u64,
    /// See [`SinkStats::position`].
    pub position: u64,
    /// See [`SinkStats::pending_bytes`].
    pub pending_bytes: u64,
    /// The most recent write error, if any.
    pub last_error: Option<String>,
}

impl SinkStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> SinkStatsSnapshot {
        SinkStatsSnapshot {
            routed: self.routed.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
            position: self.position.load(Ordering::Relaxed),
            pending_bytes: self.pending_bytes.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// A log entry of `size` bytes routed to the sink.
    pub fn routed(&self, size: u64) {
        self.routed.fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.pending_bytes.fetch_add(size, Ordering::Relaxed);
    }

    /// `n` pending messages came to their end, counted in `outcome` (one of `written`,
    /// `dead_lettered`, `dropped`, `undecodable`).
    fn settled(&self, outcome: &AtomicU64, n: u64) {
        // pending first: whoever sees the outcome counted sees it no longer pending
        self.pending.fetch_sub(
            n.min(self.pending.load(Ordering::Relaxed)),
            Ordering::SeqCst,
        );
        outcome.fetch_add(n, Ordering::SeqCst);
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// A running sink worker.
pub struct SinkHandle {
    name: String,
    stats: Arc<SinkStats>,
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

/// What a worker is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Go on.
    Run,
    /// Write what is durable in the log routed to the sink, then stop (a shutdown).
    Close,
    /// Stop after the batch being written, leaving the rest to the next worker of the sink
    /// (a sink a reload changed; a removed one once it delivered what it could).
    Halt,
}

impl SinkHandle {
    /// The sink's name (its key under `[sinks]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sink's counters.
    pub fn stats(&self) -> &Arc<SinkStats> {
        &self.stats
    }

    /// Asks the worker to write what is durable in the log and stop, waiting at most
    /// `deadline`. Returns false if the deadline passed first (what was not written stays
    /// in the log for the next start).
    pub async fn close(mut self, deadline: Duration) -> bool {
        let _ = self.stop.send(Stop::Close);
        self.wait(deadline).await
    }

    /// Asks the worker to stop once the batch it is writing is written (or, while it
    /// retries one, at once), saving its position, and waits at most `deadline` for it.
    /// Past the deadline the worker is aborted (as by a crash: the sink's recovery repeats
    /// or undoes the write it was in) and false is returned; either way the worker has
    /// ended when this returns, so another may take the sink over.
    pub async fn halt(mut self, deadline: Duration) -> bool {
        let _ = self.stop.send(Stop::Halt);
        if self.wait(deadline).await {
            return true;
        }
        self.task.abort();
        let _ = (&mut self.task).await;
        false
    }

    async fn wait(&mut self, deadline: Duration) -> bool {
        match tokio::time::timeout(deadline, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                // not aborted: a write in flight finishes or is cut by the process's exit,
                // and the sink's recovery undoes or repeats it at the next start
                tracing::warn!(sink = %self.name, "sink did not catch up within the shutdown deadline; the rest stays in the log");
                false
            }
        }
    }
}

/// What a worker needs besides its sink.
pub struct WorkerSetup {
    /// The sink's name.
    pub name: String,
    /// Batch and retry settings.
    pub batch: BatchConfig,
    /// Where given-up batches go.
    pub dead_letter: Option<String>,
    /// Where messages that can never be written go: `dead_letter`, else the built-in
    /// dead-letter sink ([`fleetbus_sinks::BUILTIN_DEAD_LETTERS`]).
    pub rejected_to: String,
    /// The saved position.
    pub position: PositionFile,
    /// Where to start reading (after [`Sink::recover`]).
    pub start: u64,
    /// The counters (shared with the engine, which adds to `pending_bytes`).
    pub stats: Arc<SinkStats>,
}

/// Starts the worker of one sink on the current tokio runtime.
pub fn spawn_sink(
    sink: Box<dyn Sink>,
    setup: WorkerSetup,
    wal: Arc<Wal>,
    tail: Arc<TailCache>,
    dead_letters: Arc<dyn DeadLetters>,
) -> SinkHandle {
    let (stop, stop_rx) = watch::channel(Stop::Run);
    let name = setup.name.clone();
    let stats = setup.stats.clone();
    stats.position.store(setup.start, Ordering::Relaxed);
    let span = tracing::info_span!("sink", sink = %name);
    let worker = Worker {
        sink,
        setup,
        wal,
        tail,
        dead_letters,
        save_errors: fleetbus_support::Throttle::new(Duration::from_secs(10)),
        rejections: fleetbus_support::Throttle::new(Duration::from_secs(10)),
        ahead: VecDeque::new(),
    };
    let task = tokio::spawn(worker.run(stop_rx).instrument(span));
    SinkHandle {
        name,
        stats,
        stop,
        task,
    }
}

struct Worker {
    sink: Box<dyn Sink>,
    setup: WorkerSetup,
    wal: Arc<Wal>,
    tail: Arc<TailCache>,
    dead_letters: Arc<dyn DeadLetters>,
    /// Bounds the log lines of failed position saves.
    save_errors: fleetbus_support::Throttle,
    /// Bounds the log lines of messages set apart as impossible to write.
    rejections: fleetbus_support::Throttle,
    /// Log entries read ahead of the cursor, in order (see [`Worker::read_ahead`]).
    ahead: VecDeque<Ahead>,
}

/// A log entry read ahead of the batch being formed.
struct Ahead {
    index: u64,
    entry: Arc<WalEntry>,
    size: u64,
    /// Not decoded yet (None), decoded, or undecodable (`Some(None)`: counted and logged
    /// once, skipped).
    message: Option<Option<Arc<Message>>>,
    /// The message body as JSON, when rendered ahead ([`Item::json`]).
    json: Option<Arc<[u8]>>,
}

/// A batch with what the worker needs beyond what the sink sees.
struct Pending {
    batch: Batch,
    bytes: u64,
    /// The scan stopped at its entry limit with more of the log possibly unread (the batch
    /// is as full as one read makes it).
    hit_end_of_scan: bool,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<Stop>) {
        let mut durable = self.wal.watch_durable();
        let mut cursor = self.setup.start;
        let mut saved = Saved {
            at: cursor,
            when: Instant::now(),
            retry_at: None,
        };
        // an exactly-once sink records each batch's end itself (and `recover` returns it):
        // its position file only needs saving now and then; another sink's is saved when
        // it has caught up, and while busy every BUSY_SAVE_INTERVAL
        let (save_when_idle, save_interval) = match self.sink.exactly_once() {
            true => (false, SAVE_INTERVAL),
            false => (true, BUSY_SAVE_INTERVAL),
        };
        loop {
            let mode = *stop.borrow();
            if mode == Stop::Halt {
                // the batch before is written: the next worker of this sink goes on from here
                if cursor != saved.at {
                    saved.retry_at = None; // one last attempt before the stop
                    self.save(cursor, &mut saved).await;
                }
                return;
            }
            let stopping = mode != Stop::Run;
            let pending = match self.next_batch(cursor) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the write-ahead log; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match pending {
                Some(p) if !p.batch.items.is_empty() => {
                    if let (Some(wait), false) = (self.linger(&p), stopping) {
                        // not full yet and young: give it `max_age` to fill, looking again
                        // every LINGER_STEP (not on every group commit: re-forming a large
                        // batch per commit would cost more than writing it)
                        tokio::select! {
                            _ = stop.changed() => {}
                            _ = tokio::time::sleep(wait.min(LINGER_STEP)) => {}
                        }
                        continue;
                    }
                    let next = p.batch.next;
                    let prefetch = self.prefetch(next);
                    let delivery = self.deliver(p, &mut stop).await;
                    self.join_prefetch(prefetch).await;
                    match delivery {
                        // stopped while retrying: resume after the last batch written
                        Delivery::Stopped => {
                            if cursor != saved.at {
                                saved.retry_at = None; // one last attempt before the stop
                                self.save(cursor, &mut saved).await;
                            }
                            return;
                        }
                        // saved below when due
                        Delivery::Written => cursor = next,
                        Delivery::DeadLettered => {
                            cursor = next;
                            self.save(cursor, &mut saved).await;
                        }
                    }
                }
                Some(p) => cursor = p.batch.next,
                None => {
                    let due = saved.when.elapsed() >= save_interval;
                    if cursor != saved.at && (stopping || save_when_idle || due) {
                        if stopping {
                            saved.retry_at = None; // one last attempt before the stop
                        }
                        self.save(cursor, &mut saved).await;
                    }
                    if stopping {
                        return;
                    }
                    let wait = if cursor != saved.at {
                        save_interval.saturating_sub(saved.when.elapsed())
                    } else {
                        Duration::MAX
                    };
                    tokio::select! {
                        _ = durable.changed() => {}
                        _ = stop.changed() => {}
                        _ = tokio::time::sleep(wait.min(SAVE_INTERVAL)) => {}
                    }
                    continue;
                }
            }
            if cursor != saved.at && saved.when.elapsed() >= save_interval {
                self.save(cursor, &mut saved).await;
            }
        }
    }

    /// How much longer a batch that is neither full (`max_events`, `max_bytes`) nor old
    /// (`max_age`, from its oldest message) may wait for more; `None` = write it now.
    fn linger(&self, p: &Pending) -> Option<Duration> {
        let b = &self.setup.batch;
        if b.max_age.is_zero()
            || p.batch.items.len() >= b.max_events
            || b.max_bytes.is_some_and(|max| p.bytes >= max)
            || p.hit_end_of_scan
        {
            return None;
        }
        let oldest = p.batch.items.first()?.received();
        let age = (Utc::now() - oldest).to_std().unwrap_or_default();
        b.max_age.checked_sub(age).filter(|d| !d.is_zero())
    }

    /// Saves the resume position durably (off the async workers). After a failure the
    /// next attempt waits [`SAVE_RETRY`], and failures are logged at a bounded rate: on a
    /// full disk this would otherwise be tens of thousands of lines a minute.
    async fn save(&mut self, cursor: u64, saved: &mut Saved) {
        if saved.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let position = self.setup.position.clone();
        let result = tokio::task::spawn_blocking(move || position.save(cursor))
            .await
            .map_err(|e| SinkError::Task(e.to_string()))
            .and_then(|r| r);
        match result {
            Ok(()) => {
                *saved = Saved {
                    at: cursor,
                    when: Instant::now(),
                    retry_at: None,
                };
                self.setup.stats.position.store(cursor, Ordering::Relaxed);
            }
            Err(e) => {
                saved.retry_at = Some(Instant::now() + SAVE_RETRY);
                if let Some(left_out) = self.save_errors.admit() {
                    tracing::error!(error = %e, similar_errors_not_logged = left_out, "cannot save the sink's position (will retry)");
                }
            }
        }
    }

    /// The next batch from `cursor`: up to `max_events` items of this sink, or `None` when
    /// the durable log is exhausted. Entries come from the shared tail cache when it holds
    /// them (already decoded), else from the log on disk.
    fn next_batch(&mut self, cursor: u64) -> Result<Option<Pending>, fleetbus_wal::WalError> {
        let scan = self.scan();
        read_ahead(&mut self.ahead, &self.wal, &self.tail, cursor, scan)?;
        let scanned = self.ahead.len().min(scan);
        let Some(last) = scanned
            .checked_sub(1)
            .and_then(|n| self.ahead.get(n))
            .map(|a| a.index)
        else {
            return Ok(None);
        };
        let mut pending = Pending {
            batch: Batch {
                first: cursor,
                next: last + 1,
                items: Vec::new(),
            },
            bytes: 0,
            hit_end_of_scan: scanned >= scan,
        };
        let stats = &*self.setup.stats;
        let (needs_message, render_json) = (self.sink.needs_message(), self.sink.writes_json());
        for ahead in self.ahead.iter_mut().take(scan) {
            if !ahead.entry.goes_to(&self.setup.name)
                || !ahead.ready(needs_message, render_json, stats)
            {
                continue;
            }
            let message = match &ahead.message {
                Some(Some(m)) => Some(m.clone()),
                _ => None,
            };
            let mut item = Item::from_entry(ahead.index, ahead.entry.clone(), message);
            item.json = ahead.json.clone();
            pending.batch.items.push(item);
            pending.bytes += ahead.size;
            let full_bytes = self
                .setup
                .batch
                .max_bytes
                .is_some_and(|max| pending.bytes >= max);
            if pending.batch.items.len() >= self.setup.batch.max_events || full_bytes {
                pending.batch.next = ahead.index + 1;
                break;
            }
        }
        Ok(Some(pending))
    }

    /// How many log entries one batch looks through at most: a batch takes up to
    /// `max_events` of them (the others belong to other sinks or wait for the next batch).
    fn scan(&self) -> usize {
        self.setup.batch.max_events * 4
    }

    /// Starts reading and decoding the entries after `next` on a blocking thread, while
    /// the batch before them is written: the sink and its destination then work at the
    /// same time as the log is read, instead of taking turns. `None` when the durable log
    /// holds nothing after `next` (nothing to do; the worker reads as before).
    fn prefetch(&mut self, next: u64) -> Option<JoinHandle<VecDeque<Ahead>>> {
        if self.wal.durable() <= next {
            return None;
        }
        let job = Prefetch {
            ahead: std::mem::take(&mut self.ahead),
            wal: self.wal.clone(),
            tail: self.tail.clone(),
            name: self.setup.name.clone(),
            stats: self.setup.stats.clone(),
            cursor: next,
            scan: self.scan(),
            render_json: self.sink.writes_json(),
            needs_message: self.sink.needs_message(),
            max_events: self.setup.batch.max_events,
            max_bytes: self.setup.batch.max_bytes,
        };
        let span = tracing::Span::current();
        Some(tokio::task::spawn_blocking(move || {
            span.in_scope(|| job.run())
        }))
    }

    /// Takes back what [`Worker::prefetch`] read. A prefetch that failed (panicked) is
    /// logged, and the worker reads again from the log.
    async fn join_prefetch(&mut self, prefetch: Option<JoinHandle<VecDeque<Ahead>>>) {
        if let Some(handle) = prefetch {
            match handle.await {
                Ok(ahead) => self.ahead = ahead,
                Err(e) => {
                    tracing::error!(error = %e, "reading the log ahead failed; reading again")
                }
            }
        }
    }

    /// Writes a batch, retrying, or hands it to the dead-letter sink. Messages that can
    /// never be written ([`ErrorClass::Permanent`]) leave the batch for the dead-letter
    /// sink at once, and the rest is written: one bad message never stalls the sink.
    async fn deliver(&mut self, mut p: Pending, stop: &mut watch::Receiver<Stop>) -> Delivery {
        let stats = self.setup.stats.clone();
        let bytes = p.bytes;
        let mut attempts = 0u32;
        let mut first_failure: Option<Instant> = None;
        let mut delay = self.setup.batch.retry_backoff;
        let mut rejected_any = false;
        let outcome = loop {
            if p.batch.items.is_empty() {
                break Delivery::DeadLettered;
            }
            let error = match self.sink.write(&p.batch).await {
                Ok(()) => {
                    stats.settled(&stats.written, p.batch.items.len() as u64);
                    break match rejected_any {
                        true => Delivery::DeadLettered,
                        false => Delivery::Written,
                    };
                }
                Err(e) => e,
            };
            stats.set_error(error.to_string());
            let error = match error.class() {
                ErrorClass::Permanent => match self.set_apart(&mut p, error).await {
                    // the rest goes again at once
                    Ok(()) => {
                        rejected_any = true;
                        continue;
                    }
                    Err(e) => e,
                },
                ErrorClass::Retryable => error,
            };
            attempts += 1;
            stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            let failing_since = *first_failure.get_or_insert_with(Instant::now);
            if self.should_give_up(attempts, failing_since)
                && self.dead_letter(&p, &error, attempts)
            {
                break Delivery::DeadLettered;
            }
            let mut wait = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
            if let SinkError::RetryAfter { wait: asked, .. } = &error {
                // the destination said when; our backoff only ever adds to it
                wait = wait.max(*asked);
            }
            tracing::warn!(error = %error, attempts, retry_in = ?wait, "sink write failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() != Stop::Run {
                return Delivery::Stopped;
            }
            delay = (delay * 2).min(self.setup.batch.retry_backoff_max);
        };
        stats.pending_bytes.fetch_sub(
            bytes.min(stats.pending_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        outcome
    }

    /// A permanent `error` for (some messages of) the batch: finds which messages cannot be
    /// written (the sink says, or each is tried alone), moves them to the dead-letter sink
    /// and takes them (and any written alone meanwhile) out of `p`. An `Err` is an error
    /// to retry the rest of the batch with (a retryable one met while trying messages
    /// alone, or a dead-letter sink that cannot take them now).
    async fn set_apart(&mut self, p: &mut Pending, error: SinkError) -> Result<(), SinkError> {
        let (bad, written) = match error.rejected_items() {
            Some(items) => (items.to_vec(), Vec::new()),
            None if p.batch.items.len() == 1 => (vec![0], Vec::new()),
            None => self.try_one_by_one(p).await?,
        };
        let bad: Vec<usize> = bad
            .into_iter()
            .filter(|&n| n < p.batch.items.len())
            .collect();
        if bad.is_empty() && written.is_empty() {
            // the sink named nothing usable: retry the whole batch
            return Err(error);
        }
        if !bad.is_empty() {
            self.reject(p, &bad, &error)?;
        }
        let stats = &self.setup.stats;
        stats.settled(&stats.written, written.len() as u64);
        let mut gone = bad;
        gone.extend(written);
        let keep = |n: &usize| !gone.contains(n);
        let mut n = 0;
        p.batch.items.retain(|_| {
            n += 1;
            keep(&(n - 1))
        });
        Ok(())
    }

    /// Writes the batch's messages one at a time to find the ones that cannot be written
    /// (for a sink that does not say which): (cannot be written, written now). A retryable
    /// error stops the search; the messages not tried yet are retried with the batch.
    async fn try_one_by_one(&mut self, p: &Pending) -> Result<(Vec<usize>, Vec<usize>), SinkError> {
        let (mut bad, mut written) = (Vec::new(), Vec::new());
        for (n, item) in p.batch.items.iter().enumerate() {
            // its own entry alone: a sink that commits a batch's end with its rows must not
            // record the whole batch as done when only this message is
            let single = Batch {
                first: item.index,
                next: item.index + 1,
                items: vec![item.clone()],
            };
            match self.sink.write(&single).await {
                Ok(()) => written.push(n),
                Err(e) if e.class() == ErrorClass::Permanent => bad.push(n),
                Err(e) if bad.is_empty() && written.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok((bad, written))
    }

    /// Moves the messages at `bad` to the dead-letter sink (this sink's `dead_letter`, else
    /// the built-in one) with `error`. The built-in sink itself, having nowhere to send
    /// them, logs and drops them (its path takes nothing from a message, so this needs a
    /// broken disk).
    fn reject(&self, p: &Pending, bad: &[usize], error: &SinkError) -> Result<(), SinkError> {
        let stats = &self.setup.stats;
        let target = self.setup.rejected_to.as_str();
        if target == self.setup.name {
            for &n in bad {
                tracing::error!(topic = %p.batch.items[n].entry.topic, error = %error, "a dead letter cannot be written anywhere: dropped");
            }
            stats.settled(&stats.dropped, bad.len() as u64);
            return Ok(());
        }
        let info = DeadLetter {
            sink: self.setup.name.clone(),
            error: error.to_string(),
            attempts: 1,
            failed_at_ms: Utc::now().timestamp_millis(),
        };
        let entries = bad
            .iter()
            .map(|&n| dead_letter_entry(&p.batch.items[n].entry, target, &info))
            .collect();
        self.dead_letters.append(target, entries).map_err(|e| {
            SinkError::Remote(format!(
                "cannot hand messages that can never be written to `{target}`: {e}"
            ))
        })?;
        stats
            .rejected
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        stats.settled(&stats.dead_lettered, bad.len() as u64);
        if let Some(left_out) = self.rejections.admit() {
            tracing::error!(error = %error, messages = bad.len(), dead_letter = %target, similar_errors_not_logged = left_out, "messages that can never be written moved to the dead-letter sink");
        }
        Ok(())
    }

    fn should_give_up(&self, attempts: u32, failing_since: Instant) -> bool {
        let b = &self.setup.batch;
        self.setup.dead_letter.is_some()
            && ((b.max_attempts > 0 && attempts >= b.max_attempts)
                || b.max_retry_age
                    .is_some_and(|age| failing_since.elapsed() >= age))
    }

    /// Hands the batch to the dead-letter sink; false if that failed (keep retrying).
    fn dead_letter(&self, p: &Pending, error: &SinkError, attempts: u32) -> bool {
        let Some(target) = &self.setup.dead_letter else {
            return false;
        };
        let info = DeadLetter {
            sink: self.setup.name.clone(),
            error: error.to_string(),
            attempts,
            failed_at_ms: Utc::now().timestamp_millis(),
        };
        let entries = p
            .batch
            .items
            .iter()
            .map(|item| dead_letter_entry(&item.entry, target, &info))
            .collect();
        match self.dead_letters.append(target, entries) {
            Ok(()) => {
                let stats = &self.setup.stats;
                stats.settled(&stats.dead_lettered, p.batch.items.len() as u64);
                tracing::error!(error = %error, attempts, messages = p.batch.items.len(), dead_letter = %target, "sink gave up a batch: sent to the dead-letter sink");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, dead_letter = %target, "cannot hand the batch to the dead-letter sink; retrying the write");
                false
            }
        }
    }
}

/// Keeps up to `scan` durable log entries from `cursor` on read ahead in `ahead`: the
/// entries before `cursor` are dropped, and more are read (from the shared tail cache when
/// it holds them, already decoded, else from the log on disk) after the last one held. A
/// batch takes at most `max_events` of them; the rest wait for the next batch instead of
/// being read and decoded again.
fn read_ahead(
    ahead: &mut VecDeque<Ahead>,
    wal: &Wal,
    tail: &TailCache,
    cursor: u64,
    scan: usize,
) -> Result<(), fleetbus_wal::WalError> {
    while ahead.front().is_some_and(|a| a.index < cursor) {
        ahead.pop_front();
    }
    if ahead.len() >= scan {
        return Ok(());
    }
    let from = ahead.back().map_or(cursor, |a| a.index + 1);
    let durable = wal.durable();
    if from >= durable {
        return Ok(());
    }
    let want = scan - ahead.len();
    let cached = tail.run(from, durable, want);
    if cached.is_empty() {
        for (index, entry, size) in wal.read_durable(from, want)? {
            ahead.push_back(Ahead {
                index,
                entry: Arc::new(entry),
                size,
                message: None,
                json: None,
            });
        }
    } else {
        for t in cached {
            ahead.push_back(Ahead {
                index: t.index,
                entry: t.entry,
                size: t.size,
                message: Some(Some(t.message)),
                json: None,
            });
        }
    }
    Ok(())
}

/// What [`Worker::prefetch`] reads with: everything it needs, owned, so it can run on a
/// blocking thread while the worker's task waits for a write.
struct Prefetch {
    ahead: VecDeque<Ahead>,
    wal: Arc<Wal>,
    tail: Arc<TailCache>,
    name: String,
    stats: Arc<SinkStats>,
    cursor: u64,
    scan: usize,
    /// Render each message's JSON ([`Sink::writes_json`]).
    render_json: bool,
    /// Decode each message ([`Sink::needs_message`]).
    needs_message: bool,
    /// Decode no more than the next batch holds (`max_events`, `max_bytes`): decoded
    /// messages take several times the memory of the entries read ahead.
    max_events: usize,
    /// See `max_events`.
    max_bytes: Option<u64>,
}

impl Prefetch {
    /// Reads the entries from `cursor` on (see [`read_ahead`]), decodes the ones routed to
    /// the sink and, for a sink that writes JSON, renders their bodies. A read error is
    /// left for the worker's own read to meet and report.
    fn run(mut self) -> VecDeque<Ahead> {
        if read_ahead(
            &mut self.ahead,
            &self.wal,
            &self.tail,
            self.cursor,
            self.scan,
        )
        .is_ok()
        {
            let ours = self.ahead.iter_mut().take(self.scan);
            let mut bytes = 0;
            for ahead in ours
                .filter(|a| a.entry.goes_to(&self.name))
                .take(self.max_events)
            {
                if self.max_bytes.is_some_and(|max| bytes >= max) {
                    break;
                }
                bytes += ahead.size;
                ahead.ready(self.needs_message, self.render_json, &self.stats);
            }
        }
        self.ahead
    }
}

impl Ahead {
    /// Prepares the entry for the sink: renders its body's JSON (once) for a sink that
    /// writes JSON, and decodes its message (once) for a sink that reads it or when the
    /// JSON cannot be rendered. False when the entry cannot be used (it cannot be
    /// decoded: see [`Ahead::decoded`]).
    fn ready(&mut self, needs_message: bool, render_json: bool, stats: &SinkStats) -> bool {
        if render_json && self.json.is_none() && self.entry.dead_letter.is_none() {
            let mut out = Vec::with_capacity(self.entry.payload.len() + 64);
            let entry = &self.entry;
            if fleetbus_protocol::write_json_body(&entry.topic, &entry.payload, &mut out).is_ok() {
                self.json = Some(Arc::from(out));
            }
        }
        let rendered = self.json.is_some() || self.entry.dead_letter.is_some();
        if needs_message || !render_json || !rendered {
            return self.decoded(stats).is_some();
        }
        true
    }

    /// The entry's message, decoded on first use. An entry that cannot be decoded is
    /// counted and logged once (it stays read ahead until the cursor passes it) and yields
    /// `None` from then on.
    fn decoded(&mut self, stats: &SinkStats) -> Option<Arc<Message>> {
        self.message
            .get_or_insert_with(|| match fleetbus_sinks::decode_entry(&self.entry) {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    stats.settled(&stats.undecodable, 1);
                    stats.pending_bytes.fetch_sub(
                        self.size.min(stats.pending_bytes.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                    tracing::error!(index = self.index, topic = %self.entry.topic, error = %e, "log entry cannot be decoded; skipped");
                    None
                }
            })
            .clone()
    }
}

/// The log entry that carries `entry` to dead-letter sink `target` with `info`.
fn dead_letter_entry(entry: &WalEntry, target: &str, info: &DeadLetter) -> WalEntry {
    WalEntry {
        topic: entry.topic.clone(),
        payload: entry.payload.clone(),
        received_ms: entry.received_ms,
        sinks: vec![target.to_string()],
        key: None,
        dead_letter: Some(info.clone()),
        groups: entry.groups.clone(),
        produced: entry.produced.clone(),
    }
}
