//! The log itself, with group commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use fleetbus_seglog::{Recovery, SegLog, SegLogError, SegLogOptions};
use tokio::sync::watch;

use crate::WalEntry;

/// WAL failures.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The underlying log failed (disk full, permissions, corruption).
    #[error("write-ahead log: {0}")]
    Log(#[from] SegLogError),
    /// An entry could not be encoded.
    #[error("write-ahead log: cannot encode entry: {0}")]
    Encode(String),
    /// An entry on disk could not be decoded.
    #[error("write-ahead log: cannot decode entry: {0}")]
    Decode(String),
    /// A state file could not be read or written.
    #[error("{}: {problem}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

/// Tunables of the WAL.
#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    /// Size of one segment file.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The write-ahead log. Share it with `Arc`.
pub struct Wal {
    dir: PathBuf,
    log: Mutex<SegLog>,
    durable: watch::Sender<u64>,
    appended_bytes: AtomicU64,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`, cutting a torn tail. Everything found on disk
    /// is durable.
    pub fn open(dir: &Path, options: WalOptions) -> Result<(Wal, Recovery), WalError> {
        let seg_options = SegLogOptions {
            segment_bytes: options.segment_bytes,
            ..SegLogOptions::default()
        };
        let (log, recovery) = SegLog::open(dir, seg_options)?;
        for (file, offset, bytes) in &recovery.cuts {
            tracing::warn!(file = %file.display(), offset, bytes, "write-ahead log: cut a torn or corrupt tail; every whole entry before it is kept");
        }
        let (durable, _) = watch::channel(log.next_index());
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                log: Mutex::new(log),
                durable,
                appended_bytes: AtomicU64::new(0),
            },
            recovery,
        ))
    }

    /// The WAL's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `entry` (not yet durable: see [`Wal::commit`]) and returns its index and
    /// size in bytes.
    pub fn append(&self, entry: &WalEntry) -> Result<(u64, u64), WalError> {
        let bytes = entry.encode()?;
        let index = self.lock().append(&bytes)?;
        let size = bytes.len() as u64 + fleetbus_seglog::RECORD_OVERHEAD;
        self.appended_bytes.fetch_add(size, Ordering::Relaxed);
        Ok((index, size))
    }

    /// Starts a group commit: flushes appends and returns what to fsync and the index up to
    /// which (exclusive) entries will then be durable. Call [`Wal::finish_commit`] after
    /// `handle.sync_data()`. Split in two so that the fsync runs without the lock, and so
    /// that callers can capture state consistent with exactly this point of the log.
    pub fn begin_commit(&self) -> Result<(std::fs::File, u64), WalError> {
        Ok(self.lock().prepare_sync()?)
    }

    /// Publishes `upto` as durable to readers.
    pub fn finish_commit(&self, upto: u64) {
        self.durable.send_if_modified(|d| {
            if upto > *d {
                *d = upto;
                true
            } else {
                false
            }
        });
    }

    /// Makes everything appended so far durable; returns the durable index.
    pub fn commit(&self) -> Result<u64, WalError> {
        let (handle, upto) = self.begin_commit()?;
        handle.sync_data().map_err(|e| WalError::State {
            path: self.dir.clone(),
            problem: format!("fsync: {e}"),
        })?;
        self.finish_commit(upto);
        Ok(upto)
    }

    /// Index up to which (exclusive) entries are durable.
    pub fn durable(&self) -> u64 {
        *self.durable.borrow()
    }

    /// A receiver that changes whenever more entries become durable.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Up to `max` durable entries from index `from` on, decoded, as (index, entry, size).
    pub fn read_durable(
        &self,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, WalEntry, u64)>, WalError> {
        let upto = self.durable();
        if from >= upto {
            return Ok(Vec::new());
        }
        let max = max.min((upto - from) as usize);
        let raw = self.lock().read_range(from, max)?;
        raw.into_iter()
            .filter(|(i, _)| *i < upto)
            .map(|(i, bytes)| {
                let size = bytes.len() as u64 + fleetbus_seglog::RECORD_OVERHEAD;
                Ok((i, WalEntry::decode(&bytes)?, size))
            })
            .collect()
    }

    /// Every entry still held, for replay at start-up (index, entry).
    pub fn read_all(
        &self,
        from: u64,
        mut each: impl FnMut(u64, WalEntry, u64),
    ) -> Result<(), WalError> {
        let mut next = from;
        loop {
            let batch = self.lock().read_range(next, 4096)?;
            let Some(last) = batch.last().map(|(i, _)| *i) else {
                return Ok(());
            };
            for (i, bytes) in batch {
                let size = bytes.len() as u64 + fleetbus_seglog::RECORD_OVERHEAD;
                each(i, WalEntry::decode(&bytes)?, size);
            }
            next = last + 1;
        }
    }

    /// Forgets entries below `index` (whole segments are deleted).
    pub fn truncate_before(&self, index: u64) -> Result<(), WalError> {
        Ok(self.lock().remove_before(index)?)
    }

    /// Index of the oldest entry held.
    pub fn first_index(&self) -> u64 {
        self.lock().first_index()
    }

    /// Index the next append gets.
    pub fn next_index(&self) -> u64 {
        self.lock().next_index()
    }

    /// Bytes appended since the WAL was opened.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, SegLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> WalEntry {
        WalEntry {
            topic: format!("fleet/a/telemetry/s{n}"),
            payload: vec![n as u8; 10],
            received_ms: 1,
            sinks: vec!["archive".into()],
            key: None,
            dead_letter: None,
            groups: Vec::new(),
            produced: None,
        }
    }

    #[test]
    fn readers_see_only_committed_entries_and_reopen_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        for n in 0..5 {
            wal.append(&entry(n)).unwrap();
        }
        assert!(
            wal.read_durable(0, 10).unwrap().is_empty(),
            "nothing durable before commit"
        );
        assert_eq!(wal.commit().unwrap(), 5);
        let got = wal.read_durable(0, 10).unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(got[3].1, entry(3));
        drop(wal);
        let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(rec.records, 5);
        assert_eq!(wal.durable(), 5);
        let mut seen = 0;
        wal.read_all(0, |_, _, _| seen += 1).unwrap();
        assert_eq!(seen, 5);
    }
}
