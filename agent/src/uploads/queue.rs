//! The upload queue: files waiting to be sent, kept in `state_dir/uploads/`, so an upload
//! survives an agent restart and continues where the server says it stands.
//!
//! - `queue/{file_id}.json`: a job (the file's path, its manifest, what to do with the file
//!   once the server confirmed it);
//! - `done/{file_id}.json`: a confirmed upload (kept for `uploads.remember`);
//! - `failed/{file_id}.json`: an upload the server refused for good, with the reason.
//!
//! Any process may drop a job into `queue/` (that is how `fleetbus agent upload` hands a
//! file to a running agent): the queue is re-read every time it is asked for the next job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fleetbus_protocol::FileManifest;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::state_file::write_json;
use crate::AgentError;

/// What happens to the agent's copy of a file once the server confirmed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterUpload {
    /// Left where it is.
    Keep,
    /// Deleted.
    Remove,
    /// Moved into this directory.
    Archive(PathBuf),
}

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadJob {
    /// The file.
    pub path: PathBuf,
    /// What it is (computed when it was queued).
    pub manifest: FileManifest,
    /// What to do with it once confirmed.
    pub after: AfterUpload,
    /// When it was queued (ms since the epoch): jobs go in this order.
    pub queued_ms: i64,
}

/// How an upload ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum UploadOutcome {
    /// The server verified the file (size and SHA-256) and routed it.
    Confirmed {
        /// The file's manifest.
        manifest: FileManifest,
        /// Where the server's sinks put it (`SINK: file PATH`, `SINK: s3://BUCKET/KEY`;
        /// empty: the server did not say).
        #[serde(default)]
        landed: Vec<String>,
    },
    /// The server refused it for good, or the file changed or vanished before it was sent.
    Failed {
        /// The file's manifest.
        manifest: FileManifest,
        /// Why.
        reason: String,
    },
}

/// Where the current upload stands (for progress bars).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadProgress {
    /// The upload (empty when none is running).
    pub file_id: String,
    /// Chunks the server holds.
    pub held: u32,
    /// Chunks in the file.
    pub total: u32,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// File size.
    pub size: u64,
}

/// Counters of the agent's uploads.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Chunk messages published (first sends and re-sends).
    pub chunks_sent: AtomicU64,
    /// Chunks sent again because the server rejected them.
    pub chunks_resent: AtomicU64,
    /// Chunk bytes published.
    pub bytes_sent: AtomicU64,
    /// Uploads the server confirmed.
    pub confirmed: AtomicU64,
    /// Uploads that failed for good.
    pub failed: AtomicU64,
}

/// The queue (see the module documentation).
#[derive(Debug)]
pub struct UploadQueue {
    dir: PathBuf,
    chunk_size: u32,
    changed: Notify,
    progress: watch::Sender<UploadProgress>,
    stats: UploadStats,
    /// Outcomes of this run, for callers waiting on one file.
    outcomes: Mutex<BTreeMap<String, UploadOutcome>>,
    finished: Notify,
}

impl UploadQueue {
    /// Opens (creating) the queue under `state_dir/uploads`.
    pub fn open(state_dir: &Path, chunk_size: u32) -> Result<UploadQueue, AgentError> {
        let dir = state_dir.join("uploads");
        for sub in ["queue", "done", "failed"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|source| AgentError::Io {
                path: d,
                op: "create directory",
                source,
            })?;
        }
        Ok(UploadQueue {
            dir,
            chunk_size,
            changed: Notify::new(),
            progress: watch::channel(UploadProgress::default()).0,
            stats: UploadStats::default(),
            outcomes: Mutex::new(BTreeMap::new()),
            finished: Notify::new(),
        })
    }

    /// The queue directory of `state_dir` (for handing jobs to a running agent).
    pub fn queue_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("uploads").join("queue")
    }

    /// Reads `path` once (size, SHA-256) and queues it with `meta`. Blocking: call from
    /// a blocking context for large files.
    pub fn prepare(
        path: &Path,
        chunk_size: u32,
        meta: BTreeMap<String, String>,
        after: AfterUpload,
    ) -> Result<UploadJob, AgentError> {
        let io = |op, source| AgentError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        if path.is_dir() {
            return Err(AgentError::NotUploadable {
                path: path.to_path_buf(),
                problem: "it is a directory: upload one file at a time (uploads.watch_dir sends every file put into a directory)".into(),
            });
        }
        let file = std::fs::File::open(path).map_err(|e| io("open", e))?;
        if !file.metadata().map_err(|e| io("stat", e))?.is_file() {
            return Err(AgentError::NotUploadable {
                path: path.to_path_buf(),
                problem: "not a regular file: only regular files can be uploaded".into(),
            });
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let mut manifest =
            fleetbus_chunker::manifest_of(std::io::BufReader::new(file), &name, chunk_size)
                .map_err(|e| io("read", e))?;
        manifest.meta = meta;
        manifest.content_type = content_type(&name).map(str::to_string);
        Ok(UploadJob {
            path: path.to_path_buf(),
            manifest,
            after,
            queued_ms: chrono::Utc::now().timestamp_millis(),
        })
    }

    /// Writes `job` into the queue directory `queue_dir` (atomically: a running agent never
    /// sees half a job).
    pub fn submit_to(queue_dir: &Path, job: &UploadJob) -> Result<(), AgentError> {
        let path = queue_dir.join(format!("{}.json", job.manifest.file_id));
        write_json(&path, job)
    }

    /// Queues `job` and wakes the sender.
    pub fn submit(&self, job: &UploadJob) -> Result<(), AgentError> {
        Self::submit_to(&self.dir.join("queue"), job)?;
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.manifest.file_id);
        self.changed.notify_one();
        Ok(())
    }

    /// The chunk size new jobs are cut into.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The oldest queued job, if any. Unreadable job files are moved to `failed/`.
    pub fn next(&self) -> Option<UploadJob> {
        let queue = self.dir.join("queue");
        let entries = std::fs::read_dir(&queue).ok()?;
        let mut best: Option<UploadJob> = None;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let job = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<UploadJob>(&b).map_err(|e| e.to_string()));
            match job {
                Ok(job) => {
                    if best.as_ref().is_none_or(|b| job.queued_ms < b.queued_ms) {
                        best = Some(job);
                    }
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable upload job moved to failed/");
                    let failed = self.dir.join("failed").join(entry.file_name());
                    let _ = fleetbus_support::durable::rename(&path, &failed);
                }
            }
        }
        best
    }

    /// Resolves when a job may have been queued.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Ends `job` with `outcome`: records it, and for a confirmed file does what
    /// `job.after` says.
    pub fn finish(&self, job: &UploadJob, outcome: UploadOutcome) {
        let id = &job.manifest.file_id;
        let queued = self.dir.join("queue").join(format!("{id}.json"));
        let record = match &outcome {
            UploadOutcome::Confirmed { .. } => {
                self.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = apply_after(&job.path, &job.after) {
                    tracing::error!(error = %e, "upload confirmed, but the file could not be removed or archived");
                }
                self.dir.join("done").join(format!("{id}.json"))
            }
            UploadOutcome::Failed { reason, .. } => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(file = %job.path.display(), %reason, "upload failed; the file is left in place");
                self.dir.join("failed").join(format!("{id}.json"))
            }
        };
        if let Err(e) = write_json(&record, &outcome) {
            tracing::warn!(error = %e, "cannot record the outcome of an upload");
        }
        if let Err(e) = std::fs::remove_file(&queued) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(file = %queued.display(), error = %e, "cannot remove a finished upload job (it would be sent again)");
            }
        }
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), outcome);
        self.progress.send_replace(UploadProgress::default());
        self.finished.notify_waiters();
    }

    /// The recorded outcome of upload `file_id` (this run, or on disk from an earlier
    /// one or another process).
    pub fn outcome(&self, file_id: &str) -> Option<UploadOutcome> {
        if let Some(o) = self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(file_id)
        {
            return Some(o.clone());
        }
        Self::outcome_on_disk(&self.dir, file_id)
    }

    /// The outcome recorded in `uploads_dir` (`state_dir/uploads`) for `file_id`.
    pub fn outcome_on_disk(uploads_dir: &Path, file_id: &str) -> Option<UploadOutcome> {
        if uploads_dir
            .join("queue")
            .join(format!("{file_id}.json"))
            .exists()
        {
            return None;
        }
        ["done", "failed"].iter().find_map(|sub| {
            let bytes =
                std::fs::read(uploads_dir.join(sub).join(format!("{file_id}.json"))).ok()?;
            serde_json::from_slice(&bytes).ok()
        })
    }

    /// Waits until upload `file_id` ended.
    pub async fn wait(&self, file_id: &str) -> UploadOutcome {
        loop {
            let notified = self.finished.notified();
            if let Some(o) = self.outcome(file_id) {
                return o;
            }
            notified.await;
        }
    }

    /// Progress of the upload running now.
    pub fn progress(&self) -> watch::Receiver<UploadProgress> {
        self.progress.subscribe()
    }

    pub(crate) fn set_progress(&self, p: UploadProgress) {
        self.progress.send_replace(p);
    }

    /// The upload counters.
    pub fn stats(&self) -> &UploadStats {
        &self.stats
    }

    /// Deletes done/failed records older than `age`.
    pub fn forget_older_than(&self, age: Duration) {
        for sub in ["done", "failed"] {
            let Ok(entries) = std::fs::read_dir(self.dir.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| d >= age);
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Removes or archives a confirmed file.
fn apply_after(path: &Path, after: &AfterUpload) -> Result<(), AgentError> {
    let io = |op, source| AgentError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    match after {
        AfterUpload::Keep => Ok(()),
        AfterUpload::Remove => {
            std::fs::remove_file(path).map_err(|e| io("remove uploaded file", e))
        }
        AfterUpload::Archive(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
                path: dir.clone(),
                op: "create archive directory",
                source,
            })?;
            let name = path.file_name().unwrap_or_default();
            let target = dir.join(name);
            match fleetbus_support::durable::rename(path, &target) {
                Ok(()) => Ok(()),
                // another file system: copy, then remove
                Err(_) => std::fs::copy(path, &target)
                    .and_then(|_| std::fs::remove_file(path))
                    .map_err(|e| io("archive uploaded file", e)),
            }
        }
    }
}

/// A MIME type from a file name's extension, for the common cases.
fn content_type(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "json" => "application/json",
        "txt" | "log" => "text/plain",
        "gz" => "application/gzip",
        "zip" => "application/zip",
        "tar" => "application/x-tar",
        "zst" => "application/zstd",
        "pcap" => "application/vnd.tcpdump.pcap",
        _ => "application/octet-stream",
    })
}
