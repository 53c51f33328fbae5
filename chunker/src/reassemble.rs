//! The receiving side: chunks written at their offsets into a spool file per upload.
//!
//! On disk, one directory per upload, `ROOT/{owner}/{file_id}/`:
//! - `manifest.json`: the manifest, written once at `init`;
//! - `data`: the file being reassembled (sparse until every chunk arrived);
//! - `held.json`: which chunks are on disk (index ranges), whether the file was verified,
//!   and the last activity time. It is rewritten only after `data` was fsynced, so after a
//!   crash it never claims a chunk that is not on disk: chunks received since are simply
//!   asked for again.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ChunkError, Rejection};
use crate::manifest::sha256_hex;
use fleetbus_protocol::FileManifest;

/// Limits of the receiving side.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest file accepted.
    pub max_file_size: u64,
    /// Most bytes of spool one owner (agent) may occupy with uploads not yet removed.
    pub quota_per_owner: u64,
    /// Largest chunk accepted.
    pub max_chunk_size: u32,
    /// Smallest chunk accepted (a file smaller than it is one chunk): tiny chunks make a
    /// large file millions of chunks, each costing a message, a write and state.
    pub min_chunk_size: u32,
    /// Most chunks one file may have (the held-chunk state is a bit per chunk: 1 Mi
    /// chunks are 128 KiB).
    pub max_chunk_count: u32,
    /// Most unfinished uploads one owner may have in the spool at once.
    pub max_uploads_per_owner: usize,
    /// The held-chunks state is saved (after an fsync of the data) at least every this many
    /// chunks; a crash costs at most this many chunks to be sent again.
    pub persist_every: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_size: 4 << 30,
            quota_per_owner: 8 << 30,
            max_chunk_size: 128 * 1024,
            min_chunk_size: 1024,
            max_chunk_count: 1 << 20,
            max_uploads_per_owner: 64,
            persist_every: 64,
        }
    }
}

/// Where an upload stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStatus {
    /// The upload.
    pub file_id: String,
    /// Chunks in the file.
    pub chunk_count: u32,
    /// Chunks on disk, as inclusive index ranges.
    pub held: Vec<(u32, u32)>,
    /// True once the whole file was verified.
    pub complete: bool,
}

impl UploadStatus {
    /// Indexes not held yet, in order.
    pub fn missing(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut next = 0u32;
        for &(lo, hi) in &self.held {
            out.extend(next..lo.min(self.chunk_count));
            next = hi.saturating_add(1);
        }
        out.extend(next..self.chunk_count);
        out
    }
}

/// What [`Reassembler::put`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written.
    Stored,
    /// Already held (or the file is already complete): nothing written.
    Duplicate,
}

/// A verified file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// Whose file.
    pub owner: String,
    /// What it is.
    pub manifest: FileManifest,
    /// Where its bytes are (stays until [`Reassembler::remove`]).
    pub path: PathBuf,
}

/// What [`Reassembler::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// (owner, file id) of every upload removed.
    pub removed: Vec<(String, String)>,
    /// Their declared sizes, summed.
    pub bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HeldState {
    held: Vec<(u32, u32)>,
    complete: bool,
    updated_ms: u64,
}

#[derive(Debug)]
struct Upload {
    manifest: FileManifest,
    dir: PathBuf,
    /// The spool file, open only while the upload is among the most recently used (see
    /// [`MAX_OPEN_FILES`]): an idle upload holds no file descriptor.
    data: Option<File>,
    held: Vec<u64>,
    held_count: u32,
    unsaved: u32,
    complete: bool,
    updated: SystemTime,
    /// SHA-256 of the chunks `0..next` as they arrived in order, so that `finish` only reads
    /// back what came out of order (and, after a restart, everything).
    running: RunningHash,
}

/// The whole-file hash, advanced chunk by chunk while chunks arrive in order.
#[derive(Debug, Clone, Default)]
struct RunningHash {
    next: u32,
    hash: Sha256,
}

/// Spool files kept open at once; the least recently used beyond are closed (and opened
/// again when their upload moves). Thousands of pending uploads hold no descriptors.
pub const MAX_OPEN_FILES: usize = 32;

impl Upload {
    /// The spool file, opened if it is not.
    fn file(&mut self) -> Result<&File, ChunkError> {
        if self.data.is_none() {
            let path = self.data_path();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| ChunkError::io(&path, "open", e))?;
            self.data = Some(f);
        }
        match &self.data {
            Some(f) => Ok(f),
            None => Err(ChunkError::io(
                self.data_path(),
                "open",
                std::io::Error::other("spool file not open"),
            )),
        }
    }

    fn has(&self, index: u32) -> bool {
        self.held[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    fn set(&mut self, index: u32) {
        self.held[(index / 64) as usize] |= 1 << (index % 64);
        self.held_count += 1;
    }

    fn clear(&mut self) {
        self.held.iter_mut().for_each(|w| *w = 0);
        self.held_count = 0;
        self.running = RunningHash::default();
    }

    /// Feeds chunk `index` (just written) to the running hash if it is the next one, then
    /// every following chunk that had arrived early (read back from the spool).
    fn advance_hash(&mut self, index: u32, data: &[u8]) -> Result<(), ChunkError> {
        if index != self.running.next {
            return Ok(());
        }
        self.running.hash.update(data);
        self.running.next += 1;
        let mut buf = Vec::new();
        while self.running.next < self.manifest.chunk_count && self.has(self.running.next) {
            let next = self.running.next;
            let len = self.manifest.len_of(next).unwrap_or(0) as usize;
            buf.resize(len, 0);
            let offset = self.manifest.offset_of(next);
            self.file()?
                .read_exact_at(&mut buf, offset)
                .map_err(|e| ChunkError::io(self.data_path(), "read", e))?;
            self.running.hash.update(&buf);
            self.running.next += 1;
        }
        Ok(())
    }

    /// The whole file's SHA-256: the running hash completed from the spool file.
    fn file_hash(&mut self) -> Result<String, ChunkError> {
        let from = self
            .manifest
            .offset_of(self.running.next.min(self.manifest.chunk_count));
        let path = self.data_path();
        let mut hash = std::mem::take(&mut self.running).hash;
        if from < self.manifest.size {
            hash_file_from(&path, from, &mut hash)?;
        }
        Ok(hex::encode(hash.finalize()))
    }

    /// The held chunks as ranges, a 64-chunk word at a time (words that are all held or
    /// all missing cost one step), so a status answer is quick whatever the file's size.
    fn ranges(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        let count = self.manifest.chunk_count;
        let mut push = |lo: u32, hi: u32| match out.last_mut() {
            Some((_, last)) if *last + 1 == lo => *last = hi,
            _ => out.push((lo, hi)),
        };
        for (w, &word) in self.held.iter().enumerate() {
            let base = (w as u32) * 64;
            if word == 0 {
                continue;
            }
            if word == u64::MAX {
                push(base, (base + 63).min(count.saturating_sub(1)));
                continue;
            }
            let mut bits = word;
            while bits != 0 {
                let start = bits.trailing_zeros();
                let run = (bits >> start).trailing_ones();
                let lo = base + start;
                let hi = (lo + run - 1).min(count.saturating_sub(1));
                push(lo, hi);
                bits &= if start + run >= 64 {
                    0
                } else {
                    !((1u64 << (start + run)) - 1)
                };
            }
        }
        out
    }

    fn status(&self) -> UploadStatus {
        UploadStatus {
            file_id: self.manifest.file_id.clone(),
            chunk_count: self.manifest.chunk_count,
            held: self.ranges(),
            complete: self.complete,
        }
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join(crate::spool::DATA_FILE)
    }

    /// fsyncs the data, then saves which chunks it holds.
    fn save(&mut self) -> Result<(), ChunkError> {
        if self.unsaved > 0 || self.data.is_some() {
            self.file()?
                .sync_data()
                .map_err(|e| ChunkError::io(self.data_path(), "fsync", e))?;
        }
        let state = HeldState {
            held: self.ranges(),
            complete: self.complete,
            updated_ms: millis(self.updated),
        };
        write_json(&self.dir.join("held.json"), &state)?;
        self.unsaved = 0;
        Ok(())
    }
}

/// Reassembles uploads from many owners under one spool directory.
#[derive(Debug)]
pub struct Reassembler {
    root: PathBuf,
    limits: Limits,
    uploads: HashMap<(String, String), Upload>,
    /// Uploads whose spool file is open, least recently used first.
    open_files: std::collections::VecDeque<(String, String)>,
}

impl Reassembler {
    /// Opens the spool at `root`, loading every upload a previous run left. An upload
    /// whose state cannot be read is reported in the second value and left on disk.
    pub fn open(root: &Path, limits: Limits) -> Result<(Reassembler, Vec<ChunkError>), ChunkError> {
        fs::create_dir_all(root).map_err(|e| ChunkError::io(root, "create directory", e))?;
        let mut r = Reassembler {
            root: root.to_path_buf(),
            limits,
            uploads: HashMap::new(),
            open_files: std::collections::VecDeque::new(),
        };
        let mut problems = Vec::new();
        for owner_dir in list_dirs(root)? {
            for upload_dir in list_dirs(&owner_dir)? {
                match load(&upload_dir, &limits) {
                    Ok(upload) => {
                        let owner = file_name(&owner_dir);
                        r.uploads
                            .insert((owner, upload.manifest.file_id.clone()), upload);
                    }
                    Err(e) => problems.push(e),
                }
            }
        }
        Ok((r, problems))
    }

    /// Starts (or resumes) `owner`'s upload of the file `manifest` describes, and says
    /// which chunks are already held. Starting the same manifest again is harmless.
    pub fn init(
        &mut self,
        owner: &str,
        manifest: FileManifest,
    ) -> Result<UploadStatus, ChunkError> {
        check_owner(owner)?;
        manifest
            .validate(self.limits.max_chunk_size)
            .map_err(|e| Rejection::Manifest(e.0))?;
        let key = (owner.to_string(), manifest.file_id.clone());
        if let Some(up) = self.uploads.get_mut(&key) {
            if up.manifest != manifest {
                return Err(Rejection::ManifestConflict(manifest.file_id).into());
            }
            up.updated = SystemTime::now();
            up.save()?;
            let status = up.status();
            self.touched(&key);
            return Ok(status);
        }
        let limits = &self.limits;
        if manifest.chunk_size < limits.min_chunk_size && manifest.chunk_count > 1 {
            return Err(Rejection::Manifest(format!(
                "chunk_size {} is below the smallest accepted, {} (files.min_chunk_size)",
                manifest.chunk_size, limits.min_chunk_size
            ))
            .into());
        }
        if manifest.chunk_count > limits.max_chunk_count {
            return Err(Rejection::Manifest(format!(
                "{} chunks are more than the {} a file may have (files.max_chunks): use larger chunks",
                manifest.chunk_count, limits.max_chunk_count
            ))
            .into());
        }
        let unfinished = self
            .uploads
            .iter()
            .filter(|((o, _), up)| o == owner && !up.complete)
            .count();
        if unfinished >= limits.max_uploads_per_owner {
            return Err(Rejection::TooManyUploads {
                owner: owner.to_string(),
                uploads: unfinished,
            }
            .into());
        }
        if manifest.size > self.limits.max_file_size {
            return Err(Rejection::TooLarge {
                size: manifest.size,
                max: self.limits.max_file_size,
            }
            .into());
        }
        let used = self.used_by(owner);
        if used + manifest.size > self.limits.quota_per_owner {
            return Err(Rejection::QuotaExceeded {
                owner: owner.to_string(),
                used,
                size: manifest.size,
                quota: self.limits.quota_per_owner,
            }
            .into());
        }
        let dir = crate::spool::upload_dir(&self.root, owner, &manifest.file_id);
        fs::create_dir_all(&dir).map_err(|e| ChunkError::io(&dir, "create directory", e))?;
        let data_path = dir.join(crate::spool::DATA_FILE);
        let data = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| ChunkError::io(&data_path, "create", e))?;
        data.set_len(manifest.size)
            .map_err(|e| ChunkError::io(&data_path, "size", e))?;
        write_json(&dir.join("manifest.json"), &manifest)?;
        let words = (manifest.chunk_count as usize).div_ceil(64);
        let mut up = Upload {
            manifest,
            dir,
            data: Some(data),
            held: vec![0; words],
            held_count: 0,
            unsaved: 0,
            complete: false,
            updated: SystemTime::now(),
            running: RunningHash::default(),
        };
        up.save()?;
        let status = up.status();
        self.uploads.insert(key.clone(), up);
        self.touched(&key);
        Ok(status)
    }

    /// Notes that `key`'s spool file was just used (and is open), closing the least
    /// recently used ones beyond [`MAX_OPEN_FILES`].
    fn touched(&mut self, key: &(String, String)) {
        if self.open_files.back() != Some(key) {
            self.open_files.retain(|k| k != key);
            self.open_files.push_back(key.clone());
        }
        while self.open_files.len() > MAX_OPEN_FILES {
            let Some(old) = self.open_files.pop_front() else {
                break;
            };
            if let Some(up) = self.uploads.get_mut(&old) {
                // written chunks stay in the page cache; a later save fsyncs them
                up.data = None;
            }
        }
    }

    /// Stores chunk `index` of an upload after checking it against the manifest: its
    /// offset, its length and its SHA-256 (`sha256`, as sent with it). Nothing is written
    /// for a rejected chunk.
    pub fn put(
        &mut self,
        owner: &str,
        file_id: &str,
        index: u32,
        offset: u64,
        data: &[u8],
        sha256: &str,
    ) -> Result<PutOutcome, ChunkError> {
        let persist_every = self.limits.persist_every.max(1);
        let up = self.upload_mut(owner, file_id)?;
        let m = &up.manifest;
        let Some(expected_len) = m.len_of(index) else {
            return Err(Rejection::IndexOutOfRange {
                index,
                count: m.chunk_count,
            }
            .into());
        };
        if offset != m.offset_of(index) {
            return Err(Rejection::Offset {
                index,
                offset,
                expected: m.offset_of(index),
            }
            .into());
        }
        if data.len() as u64 != expected_len {
            return Err(Rejection::Length {
                index,
                len: data.len(),
                expected: expected_len,
            }
            .into());
        }
        let actual = sha256_hex(data);
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(Rejection::ChunkHash {
                index,
                declared: sha256.to_string(),
                actual,
            }
            .into());
        }
        up.updated = SystemTime::now();
        if up.complete || up.has(index) {
            return Ok(PutOutcome::Duplicate);
        }
        up.file()?
            .write_all_at(data, offset)
            .map_err(|e| ChunkError::io(up.data_path(), "write", e))?;
        up.set(index);
        up.advance_hash(index, data)?;
        up.unsaved += 1;
        if up.unsaved >= persist_every {
            up.save()?;
        }
        self.touched(&(owner.to_string(), file_id.to_string()));
        Ok(PutOutcome::Stored)
    }

    /// Which chunks of an upload are on disk (saved first, so the answer survives a crash).
    pub fn status(&mut self, owner: &str, file_id: &str) -> Result<UploadStatus, ChunkError> {
        let up = self.upload_mut(owner, file_id)?;
        if up.unsaved > 0 {
            up.save()?;
        }
        Ok(up.status())
    }

    /// Declares the upload finished: every chunk must be held, and the reassembled file
    /// must hash to the manifest's SHA-256 (read back from disk, in bounded memory). On a
    /// whole-file mismatch every chunk is forgotten, so the sender sends them all again.
    pub fn finish(&mut self, owner: &str, file_id: &str) -> Result<Completed, ChunkError> {
        let up = self.upload_mut(owner, file_id)?;
        if !up.complete {
            if up.held_count < up.manifest.chunk_count {
                return Err(Rejection::Incomplete {
                    file_id: file_id.to_string(),
                    missing: up.manifest.chunk_count - up.held_count,
                    count: up.manifest.chunk_count,
                }
                .into());
            }
            up.save()?;
            let actual = up.file_hash()?;
            if !actual.eq_ignore_ascii_case(&up.manifest.sha256) {
                up.clear();
                up.save()?;
                return Err(Rejection::FileHash {
                    declared: up.manifest.sha256.clone(),
                    actual,
                }
                .into());
            }
            up.complete = true;
            up.updated = SystemTime::now();
            up.save()?;
        }
        Ok(Completed {
            owner: owner.to_string(),
            manifest: up.manifest.clone(),
            path: up.data_path(),
        })
    }

    /// Removes an upload, finished or not, and frees its spool space. Returns the bytes
    /// freed (its declared size), or `None` if there was no such upload.
    pub fn remove(&mut self, owner: &str, file_id: &str) -> Result<Option<u64>, ChunkError> {
        let key = (owner.to_string(), file_id.to_string());
        let Some(up) = self.uploads.remove(&key) else {
            return Ok(None);
        };
        self.open_files.retain(|k| k != &key);
        fs::remove_dir_all(&up.dir).map_err(|e| ChunkError::io(&up.dir, "remove", e))?;
        Ok(Some(up.manifest.size))
    }

    /// Removes every *unfinished* upload with no activity for `ttl` as of `now`.
    pub fn gc(&mut self, ttl: Duration, now: SystemTime) -> Result<GcReport, ChunkError> {
        let stale: Vec<(String, String)> = self
            .uploads
            .iter()
            .filter(|(_, up)| {
                !up.complete && now.duration_since(up.updated).unwrap_or_default() >= ttl
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut report = GcReport::default();
        for (owner, file_id) in stale {
            if let Some(bytes) = self.remove(&owner, &file_id)? {
                report.bytes += bytes;
                report.removed.push((owner, file_id));
            }
        }
        Ok(report)
    }

    /// Every upload in the spool: (owner, file id, verified, last activity).
    pub fn uploads(&self) -> Vec<(String, String, bool, SystemTime)> {
        self.uploads
            .iter()
            .map(|((o, f), up)| (o.clone(), f.clone(), up.complete, up.updated))
            .collect()
    }

    /// Bytes of spool `owner`'s uploads take (their declared sizes).
    pub fn used_by(&self, owner: &str) -> u64 {
        self.uploads
            .iter()
            .filter(|((o, _), _)| o == owner)
            .map(|(_, up)| up.manifest.size)
            .sum()
    }

    /// True when chunk `index` of an upload is on disk (or the upload is complete).
    pub fn holds(&self, owner: &str, file_id: &str, index: u32) -> bool {
        self.uploads
            .get(&(owner.to_string(), file_id.to_string()))
            .is_some_and(|up| up.complete || (index < up.manifest.chunk_count && up.has(index)))
    }

    /// The manifest of an upload in progress or complete.
    pub fn manifest(&self, owner: &str, file_id: &str) -> Option<&FileManifest> {
        self.uploads
            .get(&(owner.to_string(), file_id.to_string()))
            .map(|up| &up.manifest)
    }

    fn upload_mut(&mut self, owner: &str, file_id: &str) -> Result<&mut Upload, ChunkError> {
        self.uploads
            .get_mut(&(owner.to_string(), file_id.to_string()))
            .ok_or_else(|| Rejection::UnknownUpload(file_id.to_string()).into())
    }
}

fn check_owner(owner: &str) -> Result<(), Rejection> {
    let ok = !owner.is_empty()
        && owner.len() <= 128
        && owner != "."
        && owner != ".."
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Rejection::Owner(owner.to_string()))
    }
}

/// Loads the upload in `dir`. One whose manifest is over `limits` (left by a run with other
/// limits, or by a hostile client before there were any) is removed instead: its state
/// alone could take the memory of the whole server.
fn load(dir: &Path, limits: &Limits) -> Result<Upload, ChunkError> {
    let manifest: FileManifest = read_json(&dir.join("manifest.json"))?;
    if manifest.chunk_count > limits.max_chunk_count {
        fs::remove_dir_all(dir).map_err(|e| ChunkError::io(dir, "remove", e))?;
        return Err(ChunkError::State {
            path: dir.to_path_buf(),
            reason: format!(
                "removed: {} chunks, more than the {} a file may have",
                manifest.chunk_count, limits.max_chunk_count
            ),
        });
    }
    let state: HeldState = read_json(&dir.join("held.json"))?;
    let data_path = dir.join(crate::spool::DATA_FILE);
    // no descriptor held: opened when the upload moves again
    std::fs::metadata(&data_path).map_err(|e| ChunkError::io(&data_path, "open", e))?;
    let words = (manifest.chunk_count as usize).div_ceil(64);
    let mut up = Upload {
        manifest,
        dir: dir.to_path_buf(),
        data: None,
        held: vec![0; words],
        held_count: 0,
        unsaved: 0,
        complete: state.complete,
        updated: UNIX_EPOCH + Duration::from_millis(state.updated_ms),
        running: RunningHash::default(),
    };
    for (lo, hi) in state.held {
        for i in lo..=hi.min(up.manifest.chunk_count.saturating_sub(1)) {
            if !up.has(i) {
                up.set(i);
            }
        }
    }
    Ok(up)
}

/// Feeds `path` from byte `from` to its end into `h`, in bounded memory.
fn hash_file_from(path: &Path, from: u64, h: &mut Sha256) -> Result<(), ChunkError> {
    let mut f = File::open(path).map_err(|e| ChunkError::io(path, "open", e))?;
    f.seek(SeekFrom::Start(from))
        .map_err(|e| ChunkError::io(path, "seek", e))?;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ChunkError::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ChunkError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ChunkError::State {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    fleetbus_support::replace_file(path, &bytes).map_err(|e| ChunkError::io(path, "save", e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ChunkError> {
    let bytes = fs::read(path).map_err(|e| ChunkError::io(path, "read", e))?;
    serde_json::from_slice(&bytes).map_err(|e| ChunkError::State {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn list_dirs(dir: &Path) -> Result<Vec<PathBuf>, ChunkError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| ChunkError::io(dir, "list", e))? {
        let entry = entry.map_err(|e| ChunkError::io(dir, "list", e))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
