//! The outbox: every record goes here before it is published, and leaves only when the
//! server has acknowledged it end to end (it is in the server's write-ahead log), not when
//! the broker took it. It lives on disk (a [`SegLog`] plus a small state
//! file), so records survive agent crashes, restarts and server outages, and are published
//! again, in order, when the connection returns.
//!
//! The outbox is bounded by bytes. When unacknowledged records exceed the bound, the oldest
//! are dropped; the count is kept (across restarts) and reported as an event record
//! (`fleetbus.outbox.overflow`) the next time the agent is connected.
//!
//! Durability: a record is handed to the OS before [`Outbox::push`] returns (it survives a
//! crash of the agent). It is published only once it is also on disk: a group commit
//! ([`Outbox::commit`], run by [`Outbox::run_syncer`] at most every `fsync_interval`)
//! forces the log to disk and releases what it covered to the publisher. So a power loss
//! can only take records that never left the agent; a record the server acknowledged can
//! never be lost and its sequence number handed out again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use fleetbus_protocol::{topics, validate_id, Event, Record, Severity};
use fleetbus_seglog::{SegLog, SegLogOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

use crate::config::OutboxConfig;
use crate::AgentError;

/// Stream on which the outbox reports its own losses.
pub const EVENTS_STREAM: &str = "events";
/// Event class of an overflow report.
pub const OVERFLOW_CLASS: &str = "fleetbus.outbox.overflow";
/// How often the state file is rewritten at most while acknowledgements flow.
const STATE_WRITE_INTERVAL: Duration = Duration::from_millis(500);

/// One record ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// Position in the outbox; acknowledge with [`Outbox::ack`].
    pub index: u64,
    /// Topic to publish on.
    pub topic: String,
    /// The encoded record.
    pub payload: Vec<u8>,
}

/// Counters describing the outbox right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records waiting for acknowledgement.
    pub pending: u64,
    /// Their bytes on disk.
    pub pending_bytes: u64,
    /// Records dropped because the outbox was full, since it was created.
    pub dropped_total: u64,
    /// Records ever accepted (the next record's index).
    pub accepted_total: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PersistedState {
    /// This outbox's incarnation, stamped on every record (0 = not chosen yet).
    #[serde(default)]
    epoch: u64,
    head: u64,
    seqs: BTreeMap<String, u64>,
    unreported_drops: u64,
    dropped_total: u64,
}

struct State {
    log: SegLog,
    epoch: u64,
    head: u64,
    acked: BTreeSet<u64>,
    /// Unacknowledged records by stream and seq: (index, epoch).
    by_seq: HashMap<String, BTreeMap<u64, (u64, u64)>>,
    pending_bytes: u64,
    seqs: BTreeMap<String, u64>,
    unreported_drops: u64,
    dropped_total: u64,
    state_dirty: bool,
    last_state_write: Instant,
    /// Records below this index are on disk (and may be published).
    synced: u64,
}

/// The agent's durable outbox. Share it with `Arc`; all methods take `&self`.
pub struct Outbox {
    agent: String,
    config: OutboxConfig,
    state_path: PathBuf,
    state: Mutex<State>,
    /// Wakes the syncer: a record was pushed.
    notify: Notify,
    /// Wakes the publisher: records were forced to disk.
    durable: Notify,
    /// Tags stamped on every record pushed (the cloud identity).
    tags: std::sync::RwLock<BTreeMap<String, String>>,
}

impl Outbox {
    /// Opens (or creates) the outbox of `agent` in `dir`, recovering after a crash.
    pub fn open(dir: &Path, agent: &str, config: &OutboxConfig) -> Result<Outbox, AgentError> {
        let options = SegLogOptions {
            segment_bytes: config.segment_bytes,
            ..SegLogOptions::default()
        };
        let (mut log, recovery) = SegLog::open(dir, options)?;
        for (file, offset, bytes) in &recovery.cuts {
            tracing::warn!(file = %file.display(), offset, bytes, "outbox: cut a torn record after a crash; every whole record before it is kept");
        }
        let state_path = dir.join("outbox.state");
        let persisted = read_state(&state_path)?;
        // a torn tail cut on open can leave the saved head past the log's end: the cut
        // records are gone, and their indexes will be given to new records
        let head = persisted.head.max(log.first_index()).min(log.next_index());
        let mut seqs = persisted.seqs;
        let mut pending_bytes = 0;
        let mut by_seq: HashMap<String, BTreeMap<u64, (u64, u64)>> = HashMap::new();
        for index in log.first_index()..log.next_index() {
            let Some(bytes) = log.read(index)? else {
                continue;
            };
            let (topic, seq, payload) = decode_entry(&bytes).ok_or_else(|| AgentError::State {
                path: dir.to_path_buf(),
                problem: format!("outbox record {index} is malformed"),
            })?;
            let stream = topic.rsplit('/').next().unwrap_or_default().to_string();
            let last = seqs.entry(stream.clone()).or_insert(0);
            *last = (*last).max(seq);
            if index >= head {
                pending_bytes += log.record_bytes(index).unwrap_or(0);
                let epoch = Record::decode(payload)
                    .ok()
                    .and_then(|r| r.epoch)
                    .unwrap_or(0);
                by_seq
                    .entry(stream)
                    .or_default()
                    .insert(seq, (index, epoch));
            }
        }
        let cut = !recovery.cuts.is_empty();
        let epoch = match persisted.epoch {
            // a cut tail may have held records the server already has: their sequence
            // numbers will be given again, so they get a new epoch to be told apart
            e if e == 0 || cut => {
                let e = rand::random::<u64>().max(1);
                // saved at once: records stamped with it must never meet another epoch
                // for the same sequence numbers
                let fresh = PersistedState {
                    epoch: e,
                    head,
                    seqs: seqs.clone(),
                    unreported_drops: persisted.unreported_drops,
                    dropped_total: persisted.dropped_total,
                };
                write_state(&state_path, &fresh)?;
                tracing::info!(epoch = e, "outbox: new incarnation");
                e
            }
            e => e,
        };
        let pending = log.next_index().saturating_sub(head);
        if pending > 0 {
            tracing::info!(
                pending,
                bytes = pending_bytes,
                "outbox: records from before the restart will be published again"
            );
        }
        // what a crash left may sit in the page cache only: on disk before it is published
        log.sync()?;
        let synced = log.next_index();
        let now = Instant::now();
        Ok(Outbox {
            tags: std::sync::RwLock::new(BTreeMap::new()),
            agent: agent.to_string(),
            config: config.clone(),
            state_path,
            state: Mutex::new(State {
                log,
                epoch,
                head,
                acked: BTreeSet::new(),
                by_seq,
                pending_bytes,
                seqs,
                unreported_drops: persisted.unreported_drops,
                dropped_total: persisted.dropped_total,
                state_dirty: true,
                last_state_write: now,
                synced,
            }),
            notify: Notify::new(),
            durable: Notify::new(),
        })
    }

    /// The agent whose records this outbox holds.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Adds a record to `stream`: gives it the stream's next sequence number and the
    /// current time, lets `fill` set its body, and stores it. Returns the sequence number.
    pub fn push(&self, stream: &str, fill: impl FnOnce(&mut Record)) -> Result<u64, AgentError> {
        self.push_bounded(stream, fill, true)
    }

    fn push_bounded(
        &self,
        stream: &str,
        fill: impl FnOnce(&mut Record),
        bounded: bool,
    ) -> Result<u64, AgentError> {
        validate_id("stream", stream).map_err(|e| AgentError::Record(e.to_string()))?;
        let topic = topics::telemetry(&self.agent, stream);
        let seq = {
            let mut st = self.lock();
            let seq = st.seqs.get(stream).copied().unwrap_or(0) + 1;
            let mut record = Record::new(self.agent.clone(), stream, seq, Utc::now());
            record.tags = self
                .tags
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            fill(&mut record);
            record.agent = self.agent.clone();
            record.stream = stream.to_string();
            record.seq = seq;
            record.epoch = Some(st.epoch);
            let payload = record
                .encode()
                .map_err(|e| AgentError::Record(e.to_string()))?;
            let entry = encode_entry(&topic, seq, &payload);
            let index = st.log.append(&entry)?;
            st.log.flush()?;
            st.seqs.insert(stream.to_string(), seq);
            let epoch = st.epoch;
            st.by_seq
                .entry(stream.to_string())
                .or_default()
                .insert(seq, (index, epoch));
            st.pending_bytes += st.log.record_bytes(index).unwrap_or(0);
            st.state_dirty = true;
            if bounded {
                self.enforce_bound(&mut st);
            }
            seq
        };
        self.notify.notify_one();
        Ok(seq)
    }

    /// Sets the tags stamped on every record pushed from now on (a record's `fill` may
    /// still change its own).
    pub fn set_tags(&self, tags: BTreeMap<String, String>) {
        *self
            .tags
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = tags;
    }

    /// Up to `max` records from `cursor` on (or from the oldest unacknowledged one, if that
    /// is later), skipping any already acknowledged.
    pub fn read_from(&self, cursor: u64, max: usize) -> Result<Vec<OutboxItem>, AgentError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let start = cursor.max(st.head);
        let end = st.synced.min(start.saturating_add(max as u64));
        if end <= start {
            return Ok(Vec::new());
        }
        let mut items = Vec::with_capacity((end - start) as usize);
        let mut malformed = None;
        let acked = &st.acked;
        st.log
            .visit_range(start, (end - start) as usize, |index, bytes| {
                if index >= end || acked.contains(&index) || malformed.is_some() {
                    return;
                }
                match decode_entry(bytes) {
                    Some((topic, _, payload)) => items.push(OutboxItem {
                        index,
                        topic: topic.to_string(),
                        payload: payload.to_vec(),
                    }),
                    None => malformed = Some(index),
                }
            })?;
        if let Some(index) = malformed {
            return Err(AgentError::State {
                path: st.log.dir().to_path_buf(),
                problem: format!("outbox record {index} is malformed"),
            });
        }
        Ok(items)
    }

    /// Applies an end-to-end acknowledgement from the server: every record of `stream`
    /// numbered in `ranges` (inclusive) by incarnation `epoch` is delivered. Returns how
    /// many records it removed. Acknowledgements may come in any order and repeat.
    pub fn ack_ranges(&self, stream: &str, epoch: u64, ranges: &[(u64, u64)]) -> usize {
        let mut st = self.lock();
        let mut indexes = Vec::new();
        if let Some(pending) = st.by_seq.get_mut(stream) {
            for &(lo, hi) in ranges {
                if lo > hi {
                    continue;
                }
                let hits: Vec<u64> = pending
                    .range(lo..=hi)
                    .filter(|(_, (_, e))| *e == epoch)
                    .map(|(seq, _)| *seq)
                    .collect();
                for seq in hits {
                    if let Some((index, _)) = pending.remove(&seq) {
                        indexes.push(index);
                    }
                }
            }
        }
        for index in &indexes {
            Self::ack_index(&mut st, *index);
        }
        indexes.len()
    }

    /// Marks the record at `index` as delivered (tests and tools; the agent itself uses
    /// [`Outbox::ack_ranges`]).
    pub fn ack(&self, index: u64) {
        let mut st = self.lock();
        Self::ack_index(&mut st, index);
    }

    fn ack_index(st: &mut State, index: u64) {
        if index < st.head || index >= st.log.next_index() {
            return;
        }
        if index != st.head {
            st.acked.insert(index);
            return;
        }
        loop {
            let head = st.head;
            st.pending_bytes -= st.log.record_bytes(head).unwrap_or(0).min(st.pending_bytes);
            st.head += 1;
            let next = st.head;
            if !st.acked.remove(&next) {
                break;
            }
        }
        st.state_dirty = true;
    }

    /// Index of the oldest unacknowledged record (where a new connection starts publishing).
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// Current counters.
    pub fn stats(&self) -> OutboxStats {
        let st = self.lock();
        OutboxStats {
            pending: st.log.next_index() - st.head,
            pending_bytes: st.pending_bytes,
            dropped_total: st.dropped_total,
            accepted_total: st.log.next_index(),
        }
    }

    /// Resolves when a record is pushed (at most one stored wake-up).
    pub fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// Resolves when pushed records were forced to disk and may now be published.
    pub fn durable_notified(&self) -> Notified<'_> {
        self.durable.notified()
    }

    /// Group commit: forces every record pushed so far to disk and releases them to the
    /// publisher. The fsync runs without the lock, so pushes continue meanwhile. Blocking:
    /// call it off the async workers. Returns false when there was nothing to do.
    pub fn commit(&self) -> Result<bool, AgentError> {
        let (handle, upto, dir) = {
            let mut st = self.lock();
            if st.synced >= st.log.next_index() {
                return Ok(false);
            }
            let (handle, upto) = st.log.prepare_sync()?;
            (handle, upto, st.log.dir().to_path_buf())
        };
        handle.sync_data().map_err(|source| {
            AgentError::Log(fleetbus_seglog::SegLogError::Io {
                path: dir,
                op: "fsync",
                source,
            })
        })?;
        {
            let mut st = self.lock();
            st.synced = st.synced.max(upto);
        }
        self.durable.notify_one();
        Ok(true)
    }

    /// Runs group commits until `shutdown`: after each push, waits until `fsync_interval`
    /// has passed since the previous commit, then commits everything pushed meanwhile.
    pub async fn run_syncer(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last = Instant::now()
            .checked_sub(self.config.fsync_interval)
            .unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                _ = self.notified() => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
            let next = last + self.config.fsync_interval;
            tokio::time::sleep_until(next.into()).await;
            last = Instant::now();
            let outbox = self.clone();
            match tokio::task::spawn_blocking(move || outbox.commit()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot force the outbox to disk: records wait (retrying in 1 s)");
                    self.notify.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => tracing::error!(error = %e, "outbox syncer task failed"),
            }
        }
    }

    /// If records were dropped since the last report, pushes an overflow event saying how
    /// many. Returns the count reported.
    pub fn report_drops(&self) -> Result<Option<u64>, AgentError> {
        let (count, total) = {
            let mut st = self.lock();
            let n = std::mem::take(&mut st.unreported_drops);
            st.state_dirty = true;
            (n, st.dropped_total)
        };
        if count == 0 {
            return Ok(None);
        }
        let max_bytes = self.config.max_bytes;
        // the report may exceed the bound by its own size: making room for it would drop
        // records that this very report could not count
        let pushed = self.push_bounded(EVENTS_STREAM, |r| {
            r.event = Some(Event {
                class: OVERFLOW_CLASS.to_string(),
                severity: Severity::MAJOR,
                rule: None,
                group: None,
                resources: Vec::new(),
                text: format!(
                    "agent outbox was full ({max_bytes} bytes): the {count} oldest records were dropped ({total} since the outbox was created)"
                ),
                clear: false,
            });
            r.fields.insert("dropped".into(), count.into());
            r.fields.insert("dropped_total".into(), total.into());
        }, false);
        if let Err(e) = pushed {
            self.lock().unreported_drops += count;
            return Err(e);
        }
        tracing::warn!(
            dropped = count,
            total,
            "reported outbox overflow as an event"
        );
        Ok(Some(count))
    }

    /// Periodic housekeeping: saves the state file and deletes segments that hold only
    /// acknowledged records.
    pub fn maintain(&self) -> Result<(), AgentError> {
        self.maintain_at(false)
    }

    /// Forces everything to disk now (call before exiting).
    pub fn sync(&self) -> Result<(), AgentError> {
        self.maintain_at(true)
    }

    fn maintain_at(&self, force: bool) -> Result<(), AgentError> {
        let mut st = self.lock();
        let now = Instant::now();
        if force && st.synced < st.log.next_index() {
            st.log.sync()?;
            st.synced = st.log.next_index();
        }
        if st.state_dirty
            && (force || now.duration_since(st.last_state_write) >= STATE_WRITE_INTERVAL)
        {
            // the state (head and sequence numbers) must be on disk before any segment that
            // holds the records it accounts for is deleted
            let persisted = PersistedState {
                epoch: st.epoch,
                head: st.head,
                seqs: st.seqs.clone(),
                unreported_drops: st.unreported_drops,
                dropped_total: st.dropped_total,
            };
            write_state(&self.state_path, &persisted)?;
            st.state_dirty = false;
            st.last_state_write = now;
            let head = st.head;
            st.log.remove_before(head)?;
            // forget the seq → index entries of records dropped by overflow (a prefix of
            // each stream: indexes grow with seqs)
            for pending in st.by_seq.values_mut() {
                while let Some(entry) = pending.first_entry() {
                    if entry.get().0 >= head {
                        break;
                    }
                    entry.remove();
                }
            }
        }
        Ok(())
    }

    fn enforce_bound(&self, st: &mut State) {
        let mut dropped = 0u64;
        while st.pending_bytes > self.config.max_bytes && st.head + 1 < st.log.next_index() {
            let head = st.head;
            st.pending_bytes -= st.log.record_bytes(head).unwrap_or(0).min(st.pending_bytes);
            st.acked.remove(&head);
            st.head += 1;
            dropped += 1;
        }
        if dropped > 0 {
            if st.unreported_drops == 0 {
                tracing::warn!(max_bytes = self.config.max_bytes, "outbox full: dropping the oldest records (the count will be reported as an event)");
            }
            st.unreported_drops += dropped;
            st.dropped_total += dropped;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // a panic while holding the lock leaves consistent data (every mutation is a
        // single step), so keep going with it
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn encode_entry(topic: &str, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + topic.len() + 8 + payload.len());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn decode_entry(bytes: &[u8]) -> Option<(&str, u64, &[u8])> {
    let len = u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]) as usize;
    let topic = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?;
    let seq_bytes: [u8; 8] = bytes.get(2 + len..10 + len)?.try_into().ok()?;
    Some((topic, u64::from_le_bytes(seq_bytes), bytes.get(10 + len..)?))
}

fn read_state(path: &Path) -> Result<PersistedState, AgentError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
            path: path.to_path_buf(),
            problem: format!("unreadable outbox state: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PersistedState::default()),
        Err(source) => Err(AgentError::Io {
            path: path.to_path_buf(),
            op: "read outbox state",
            source,
        }),
    }
}

fn write_state(path: &Path, state: &PersistedState) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec(state).map_err(|e| AgentError::Record(e.to_string()))?;
    fleetbus_support::replace_file(path, &bytes).map_err(|source| AgentError::Io {
        path: path.to_path_buf(),
        op: "write outbox state",
        source,
    })
}

#[cfg(test)]
mod tests;
