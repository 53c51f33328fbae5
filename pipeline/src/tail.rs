//! The newest write-ahead-log entries, kept decoded in memory and shared by every sink
//! worker.
//!
//! The rules engine decodes each message once to route it; it puts the entry and the
//! decoded message here as it appends them to the log. A worker that keeps up with the log
//! takes its next entries from here instead of reading and decoding them again; a worker
//! that lags (or starts after a restart) reads the log on disk. The cache is bounded by
//! the memory its entries take (their encoded bytes twice over, for the entry and its
//! decoded message, plus a fixed cost per entry; see [`TailEntry::memory`]): the oldest
//! are forgotten first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use fleetbus_protocol::Message;
use fleetbus_wal::WalEntry;

/// One log entry with its decoded message.
#[derive(Debug, Clone)]
pub struct TailEntry {
    /// Its index in the log.
    pub index: u64,
    /// The entry as stored.
    pub entry: Arc<WalEntry>,
    /// Its size in the log (framing included), as counted for backpressure.
    pub size: u64,
    /// The decoded message (its `received` time at the log's millisecond precision).
    pub message: Arc<Message>,
}

/// What one cached entry costs besides its bytes: the structs, the `Arc`s, the decoded
/// JSON's maps and strings (measured: ~10,000 small records took ~6 MiB when counted by
/// their encoded size alone).
const ENTRY_OVERHEAD: u64 = 512;

impl TailEntry {
    /// The memory this entry is counted for: its encoded bytes held twice (as stored and
    /// decoded) and [`ENTRY_OVERHEAD`].
    pub fn memory(&self) -> u64 {
        self.size.saturating_mul(2).saturating_add(ENTRY_OVERHEAD)
    }
}

#[derive(Debug, Default)]
struct Entries {
    queue: VecDeque<TailEntry>,
    bytes: u64,
}

/// A bounded run of the newest log entries, in index order.
#[derive(Debug)]
pub struct TailCache {
    entries: Mutex<Entries>,
    max_bytes: u64,
}

impl TailCache {
    /// A cache holding entries taking at most `max_bytes` of memory ([`TailEntry::memory`]).
    pub fn new(max_bytes: u64) -> TailCache {
        TailCache {
            entries: Mutex::new(Entries::default()),
            max_bytes,
        }
    }

    /// Adds the entry just appended at `e.index`. Indexes must grow; an entry whose index
    /// is not above the newest one empties the cache first (it only ever holds one
    /// ascending run, possibly with gaps where entries were appended without it).
    pub fn insert(&self, e: TailEntry) {
        let mut entries = self.lock();
        if entries.queue.back().is_some_and(|b| b.index >= e.index) {
            *entries = Entries::default();
        }
        entries.bytes += e.memory();
        entries.queue.push_back(e);
        while entries.bytes > self.max_bytes {
            let Some(old) = entries.queue.pop_front() else {
                break;
            };
            entries.bytes -= old.memory();
        }
    }

    /// Up to `max` entries with consecutive indexes `from, from + 1, ...` below `upto`.
    /// Empty when `from` is not held; shorter than asked where the run has a gap (the
    /// caller reads the rest from the log).
    pub fn run(&self, from: u64, upto: u64, max: usize) -> Vec<TailEntry> {
        let entries = self.lock();
        let queue = &entries.queue;
        let Some(first) = queue.front().map(|e| e.index) else {
            return Vec::new();
        };
        if from < first {
            return Vec::new();
        }
        // without gaps the entry sits at `from - first`; with gaps it is earlier
        let guess = ((from - first) as usize).min(queue.len().saturating_sub(1));
        let start = if queue[guess].index == from {
            guess
        } else {
            match queue.binary_search_by_key(&from, |e| e.index) {
                Ok(i) => i,
                Err(_) => return Vec::new(),
            }
        };
        let mut out = Vec::new();
        for (expect, e) in (from..).zip(queue.range(start..)) {
            if e.index != expect || e.index >= upto || out.len() >= max {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, size: u64) -> TailEntry {
        let message = Message::decode("fleet/a/telemetry/s", br#"{"seq":1}"#).unwrap();
        TailEntry {
            index,
            entry: Arc::new(WalEntry {
                topic: "fleet/a/telemetry/s".into(),
                payload: vec![],
                received_ms: 0,
                sinks: vec![],
                key: None,
                dead_letter: None,
                groups: Vec::new(),
                produced: None,
            }),
            size,
            message: Arc::new(message),
        }
    }

    fn indexes(v: &[TailEntry]) -> Vec<u64> {
        v.iter().map(|e| e.index).collect()
    }

    #[test]
    fn returns_consecutive_runs_below_the_durable_index() {
        let c = TailCache::new(1 << 20);
        for i in [5, 6, 7, 9, 10] {
            c.insert(entry(i, 10));
        }
        assert_eq!(indexes(&c.run(5, 100, 100)), vec![5, 6, 7]);
        assert_eq!(indexes(&c.run(6, 7, 100)), vec![6]);
        assert_eq!(indexes(&c.run(5, 100, 2)), vec![5, 6]);
        assert!(c.run(8, 100, 100).is_empty(), "8 was never cached");
        assert_eq!(indexes(&c.run(9, 100, 100)), vec![9, 10]);
        assert!(c.run(4, 100, 100).is_empty(), "before the cache");
        assert!(c.run(11, 100, 100).is_empty(), "after the cache");
    }

    #[test]
    fn forgets_the_oldest_beyond_its_size_and_restarts_on_a_lower_index() {
        // room for three entries of 10 bytes (each counted 2 × 10 + the overhead)
        let c = TailCache::new(3 * (20 + ENTRY_OVERHEAD));
        for i in 0..5 {
            c.insert(entry(i, 10));
        }
        assert!(c.run(1, 100, 100).is_empty());
        assert_eq!(indexes(&c.run(2, 100, 100)), vec![2, 3, 4]);
        c.insert(entry(3, 10));
        assert_eq!(indexes(&c.run(3, 100, 100)), vec![3]);
        assert!(c.run(2, 100, 100).is_empty());
    }
}
