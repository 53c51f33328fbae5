//! A segmented append-only log with a CRC-32 per record, for data that must survive a
//! crash: the agent's outbox and the server's write-ahead log (`fleetbus-wal`).
//!
//! On disk a log is a directory of segment files named by the index of their first record
//! (`00000000000000000042.seg`). A segment starts with an 8-byte magic; each record is
//! `[len: u32 LE][crc32(payload): u32 LE][payload]`. Only the newest segment is appended to.
//!
//! Opening a log scans every segment. A partial or corrupt record at the end of a segment
//! (a torn write after `kill -9` or power loss) is cut off and reported; everything before
//! it is kept. Indexes are never reused: they keep growing across restarts.
//!
//! Durability is explicit: [`SegLog::append`] buffers, [`SegLog::flush`] hands the bytes
//! to the operating system (survives a process crash), [`SegLog::sync`] also forces them to
//! the disk (survives power loss). Callers batch `sync` to get group commit.

mod error;
mod segment;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use error::SegLogError;
use segment::{scan_segment, segment_path, HEADER_LEN, MAGIC};

/// Bytes of framing in front of every record (length + CRC).
pub const RECORD_OVERHEAD: u64 = 8;

/// Neighbouring records are read together up to about this many bytes.
const MAX_READ_SPAN: u64 = 1024 * 1024;

/// Tunables of a log.
#[derive(Debug, Clone, Copy)]
pub struct SegLogOptions {
    /// A new segment is started once the active one reaches this many bytes.
    pub segment_bytes: u64,
    /// Largest accepted payload; larger appends are refused, larger lengths on disk are
    /// treated as corruption.
    pub max_record_bytes: u32,
}

impl Default for SegLogOptions {
    fn default() -> Self {
        SegLogOptions {
            segment_bytes: 8 * 1024 * 1024,
            max_record_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What opening a log found and repaired.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Whole records found.
    pub records: u64,
    /// Torn or corrupt tails that were cut: (segment file, offset of the cut, bytes removed).
    pub cuts: Vec<(PathBuf, u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    index: u64,
    segment: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    file: File,
}

/// An open log. Not thread-safe by itself: wrap it in a mutex to share.
#[derive(Debug)]
pub struct SegLog {
    dir: PathBuf,
    options: SegLogOptions,
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
    active_bytes: u64,
    entries: VecDeque<Entry>,
    next_index: u64,
    live_bytes: u64,
    unflushed: bool,
}

impl SegLog {
    /// Opens (or creates) the log in `dir`, cutting torn tails.
    pub fn open(dir: &Path, options: SegLogOptions) -> Result<(SegLog, Recovery), SegLogError> {
        fs::create_dir_all(dir).map_err(|e| SegLogError::io(dir, "create directory", e))?;
        let mut bases = list_segments(dir)?;
        bases.sort_unstable();
        let mut recovery = Recovery::default();
        let mut entries = VecDeque::new();
        let mut segments = VecDeque::new();
        let mut next_index = 0;
        for &base in &bases {
            let path = segment_path(dir, base);
            if base < next_index {
                return Err(SegLogError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!("segment starts at record {base} but the previous segment already reached {next_index}"),
                });
            }
            let scan = scan_segment(&path, base, options.max_record_bytes)?;
            if let Some((offset, cut)) = scan.cut {
                tracing::warn!(file = %path.display(), offset, bytes = cut, reason = %scan.cut_reason, "cut torn or corrupt tail of log segment");
                recovery.cuts.push((path.clone(), offset, cut));
            }
            for (i, (offset, len)) in scan.records.iter().enumerate() {
                entries.push_back(Entry {
                    index: base + i as u64,
                    segment: base,
                    offset: *offset,
                    len: *len,
                });
            }
            recovery.records += scan.records.len() as u64;
            next_index = base + scan.records.len() as u64;
            let file = File::open(&path).map_err(|e| SegLogError::io(&path, "open", e))?;
            segments.push_back(Segment { base, path, file });
        }
        let live_bytes = entries.iter().map(|e| e.len as u64 + RECORD_OVERHEAD).sum();
        let (writer, active_bytes) = match segments.back() {
            Some(seg) => {
                let file = fs::OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(|e| SegLogError::io(&seg.path, "open for append", e))?;
                let len = file
                    .metadata()
                    .map_err(|e| SegLogError::io(&seg.path, "stat", e))?
                    .len();
                (BufWriter::with_capacity(64 * 1024, file), len)
            }
            None => {
                let (seg, writer) = create_segment(dir, next_index)?;
                segments.push_back(seg);
                (writer, HEADER_LEN)
            }
        };
        let log = SegLog {
            dir: dir.to_path_buf(),
            options,
            segments,
            writer,
            active_bytes,
            entries,
            next_index,
            live_bytes,
            unflushed: false,
        };
        Ok((log, recovery))
    }

    /// Appends one record (buffered; see [`SegLog::flush`]) and returns its index.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, SegLogError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= self.options.max_record_bytes)
            .ok_or(SegLogError::RecordTooLarge {
                len: payload.len(),
                max: self.options.max_record_bytes,
            })?;
        if self.active_bytes >= self.options.segment_bytes {
            self.rotate()?;
        }
        let active = self.active_base();
        let offset = self.active_bytes;
        let crc = crc32fast::hash(payload);
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..].copy_from_slice(&crc.to_le_bytes());
        let (dir, base) = (&self.dir, active);
        self.writer
            .write_all(&header)
            .and_then(|_| self.writer.write_all(payload))
            .map_err(|e| SegLogError::io(&segment_path(dir, base), "append", e))?;
        self.unflushed = true;
        self.active_bytes += RECORD_OVERHEAD + len as u64;
        self.live_bytes += RECORD_OVERHEAD + len as u64;
        let index = self.next_index;
        self.entries.push_back(Entry {
            index,
            segment: active,
            offset,
            len,
        });
        self.next_index += 1;
        Ok(index)
    }

    /// Hands buffered appends to the operating system: they now survive a process crash.
    pub fn flush(&mut self) -> Result<(), SegLogError> {
        if self.unflushed {
            let (dir, base) = (&self.dir, self.active_base());
            self.writer
                .flush()
                .map_err(|e| SegLogError::io(&segment_path(dir, base), "write", e))?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Flushes and forces the active segment to stable storage.
    pub fn sync(&mut self) -> Result<(), SegLogError> {
        self.flush()?;
        self.writer
            .get_ref()
            .sync_data()
            .map_err(|e| SegLogError::io(&self.active_path(), "fsync", e))
    }

    /// Flushes buffered appends and returns a handle on the active segment and the index
    /// up to which (exclusive) records will be durable once `handle.sync_data()` returns.
    /// Lets a caller fsync without holding whatever lock guards the log (group commit);
    /// segments before the active one were synced when they were closed.
    pub fn prepare_sync(&mut self) -> Result<(File, u64), SegLogError> {
        self.flush()?;
        let path = self.active_path();
        let handle = self
            .writer
            .get_ref()
            .try_clone()
            .map_err(|e| SegLogError::io(&path, "clone handle", e))?;
        Ok((handle, self.next_index))
    }

    /// Reads up to `max` records from index `from` on (records removed or lost in a gap
    /// are skipped), as (index, payload).
    pub fn read_range(
        &mut self,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SegLogError> {
        let mut out = Vec::new();
        self.visit_range(from, max, |index, payload| {
            out.push((index, payload.to_vec()))
        })?;
        Ok(out)
    }

    /// Calls `each(index, payload)` for up to `max` records from index `from` on, in
    /// order (records removed or lost in a gap are skipped). Neighbouring records are read
    /// with one system call; every CRC is checked again. Returns how many were visited.
    pub fn visit_range(
        &mut self,
        from: u64,
        max: usize,
        mut each: impl FnMut(u64, &[u8]),
    ) -> Result<usize, SegLogError> {
        let start = self.entries.partition_point(|e| e.index < from);
        let end = start.saturating_add(max).min(self.entries.len());
        if start < end && self.entries[end - 1].segment == self.active_base() {
            self.flush()?;
        }
        let mut buf = Vec::new();
        let mut i = start;
        while i < end {
            let first = self.entries[i];
            let mut j = i + 1;
            let mut span = RECORD_OVERHEAD + first.len as u64;
            while j < end {
                let e = self.entries[j];
                if e.segment != first.segment
                    || e.offset != first.offset + span
                    || span >= MAX_READ_SPAN
                {
                    break;
                }
                span += RECORD_OVERHEAD + e.len as u64;
                j += 1;
            }
            let Some(seg) = self.segments.iter().find(|s| s.base == first.segment) else {
                i = j;
                continue;
            };
            buf.resize(span as usize, 0);
            seg.file
                .read_exact_at(&mut buf, first.offset)
                .map_err(|e| SegLogError::io(&seg.path, "read", e))?;
            for e in self.entries.range(i..j) {
                let at = (e.offset - first.offset) as usize;
                let header = &buf[at..at + RECORD_OVERHEAD as usize];
                let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                let body = at + RECORD_OVERHEAD as usize;
                let payload = &buf[body..body + e.len as usize];
                if crc32fast::hash(payload) != crc {
                    return Err(SegLogError::Corrupt {
                        path: seg.path.clone(),
                        offset: e.offset,
                        reason: "record checksum mismatch on read".into(),
                    });
                }
                each(e.index, payload);
            }
            i = j;
        }
        Ok(end - start)
    }

    /// Reads the record at `index`, or `None` if it was removed or never written.
    /// The CRC is checked again, so on-disk corruption after opening is reported, not returned.
    pub fn read(&mut self, index: u64) -> Result<Option<Vec<u8>>, SegLogError> {
        let Some(entry) = self.entry(index) else {
            return Ok(None);
        };
        if entry.segment == self.active_base() {
            self.flush()?;
        }
        let Some(seg) = self.segments.iter().find(|s| s.base == entry.segment) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; RECORD_OVERHEAD as usize + entry.len as usize];
        seg.file
            .read_exact_at(&mut buf, entry.offset)
            .map_err(|e| SegLogError::io(&seg.path, "read", e))?;
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let payload = buf.split_off(RECORD_OVERHEAD as usize);
        if crc32fast::hash(&payload) != crc {
            return Err(SegLogError::Corrupt {
                path: seg.path.clone(),
                offset: entry.offset,
                reason: "record checksum mismatch on read".into(),
            });
        }
        Ok(Some(payload))
    }

    /// Forgets every record below `index` and deletes segments that hold nothing else.
    /// The active segment is never deleted, so the next index survives a restart.
    pub fn remove_before(&mut self, index: u64) -> Result<(), SegLogError> {
        while let Some(front) = self.entries.front() {
            if front.index >= index {
                break;
            }
            self.live_bytes -= front.len as u64 + RECORD_OVERHEAD;
            self.entries.pop_front();
        }
        let keep_from = self
            .entries
            .front()
            .map(|e| e.segment)
            .unwrap_or_else(|| self.active_base());
        while self.segments.len() > 1 {
            let Some(front) = self.segments.front() else {
                break;
            };
            if front.base >= keep_from {
                break;
            }
            fs::remove_file(&front.path).map_err(|e| SegLogError::io(&front.path, "remove", e))?;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Index of the oldest record still held (equals [`SegLog::next_index`] when empty).
    pub fn first_index(&self) -> u64 {
        self.entries
            .front()
            .map(|e| e.index)
            .unwrap_or(self.next_index)
    }

    /// Index the next append will get.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes (payload + framing) of the records held.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Bytes of one held record (payload + framing), if it is held.
    pub fn record_bytes(&self, index: u64) -> Option<u64> {
        self.entry(index).map(|e| e.len as u64 + RECORD_OVERHEAD)
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, index: u64) -> Option<Entry> {
        let first = self.entries.front()?.index;
        let guess = index.checked_sub(first)? as usize;
        match self.entries.get(guess) {
            Some(e) if e.index == index => Some(*e),
            // a gap left by a corrupt segment: fall back to a search
            _ => {
                let pos = self.entries.partition_point(|e| e.index < index);
                self.entries.get(pos).filter(|e| e.index == index).copied()
            }
        }
    }

    fn active_base(&self) -> u64 {
        self.segments.back().map(|s| s.base).unwrap_or(0)
    }

    fn active_path(&self) -> PathBuf {
        segment_path(&self.dir, self.active_base())
    }

    fn rotate(&mut self) -> Result<(), SegLogError> {
        self.sync()?;
        let (seg, writer) = create_segment(&self.dir, self.next_index)?;
        self.segments.push_back(seg);
        self.writer = writer;
        self.active_bytes = HEADER_LEN;
        Ok(())
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, SegLogError> {
    let mut bases = Vec::new();
    let read = fs::read_dir(dir).map_err(|e| SegLogError::io(dir, "list", e))?;
    for entry in read {
        let entry = entry.map_err(|e| SegLogError::io(dir, "list", e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(base) = stem.parse::<u64>() {
            bases.push(base);
        }
    }
    Ok(bases)
}

fn create_segment(dir: &Path, base: u64) -> Result<(Segment, BufWriter<File>), SegLogError> {
    let path = segment_path(dir, base);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| SegLogError::io(&path, "create", e))?;
    file.write_all(MAGIC)
        .and_then(|_| file.sync_data())
        .map_err(|e| SegLogError::io(&path, "write header", e))?;
    if let Ok(d) = File::open(dir) {
        // make the new file's directory entry durable; failure only weakens power-loss safety
        let _ = d.sync_all();
    }
    let reader = File::open(&path).map_err(|e| SegLogError::io(&path, "open", e))?;
    let writer = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| SegLogError::io(&path, "open for append", e))?;
    Ok((
        Segment {
            base,
            path,
            file: reader,
        },
        BufWriter::with_capacity(64 * 1024, writer),
    ))
}

#[cfg(test)]
mod tests;
