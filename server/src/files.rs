//! The file service: receives chunked uploads (`fleet/{agent}/files/{file_id}/...`),
//! reassembles and verifies them in the spool, publishes a completion message through the
//! rules engine (rules route it like any other message), answers the agent on
//! `fleet/{agent}/replies/files`, and removes a file from the spool once every sink its
//! completion went to has written it.
//!
//! It runs on a thread of its own (every step is blocking disk I/O) fed by a bounded
//! channel, so a slow disk slows the uploads, never telemetry.
//!
//! On disk, under `data_dir/files/`:
//! - `spool/{agent}/{file_id}/`: the chunker's upload state, plus `delivery.json` (the log
//!   index of the completion message and the sinks it went to) once verified;
//! - `delivered/{agent}/{file_id}`: a note that the file was delivered, kept for
//!   `files.remember`, so uploading the same file again is answered "complete" at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fleetbus_chunker::{ChunkError, Limits, Manifest, PutOutcome, Reassembler, Rejection};
use fleetbus_pipeline::{Dispatched, Engine};
use fleetbus_protocol::files::{self, parse_file_rest, FileAction};
use fleetbus_protocol::{
    ChunkOutcome, FileChunk, FileCompleted, FileInit, FileManifest, FileReply, RefusalKind, Topic,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// `[files]`: limits and retention of the file service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSection {
    /// Largest file accepted, in bytes.
    pub max_file_size: u64,
    /// Most spool bytes one agent's uploads may occupy (unfinished and not yet delivered).
    pub quota_per_agent: u64,
    /// Largest chunk accepted, in bytes (a chunk message must fit 128 KiB).
    pub max_chunk_size: u32,
    /// Smallest chunk accepted, in bytes (a file smaller than it is one chunk).
    pub min_chunk_size: u32,
    /// Most chunks one file may have: the server keeps a bit per chunk, and every chunk
    /// is a message, a write and a reply.
    pub max_chunks: u32,
    /// Most unfinished uploads one agent may have in the spool at once.
    pub max_uploads_per_agent: usize,
    /// An upload with no activity for this long is removed from the spool (counted as
    /// garbage collected); so is a verified file no rule routes.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a delivered file is remembered, so uploading it again is answered at once.
    #[serde(with = "humantime_serde")]
    pub remember: Duration,
    /// The spool is fsynced and the list of held chunks saved every this many chunks (and
    /// before every status answer): a server crash costs at most this many chunks sent
    /// again.
    pub persist_every: u32,
}

impl Default for FilesSection {
    fn default() -> Self {
        FilesSection {
            max_file_size: 4 << 30,
            quota_per_agent: 8 << 30,
            max_chunk_size: 128 * 1024,
            min_chunk_size: 1024,
            max_chunks: 1 << 20,
            max_uploads_per_agent: 64,
            ttl: Duration::from_secs(24 * 3600),
            remember: Duration::from_secs(7 * 24 * 3600),
            persist_every: 512,
        }
    }
}

/// What serde cannot check (keys relative to `[files]`).
impl fleetbus_config::Check for FilesSection {
    fn check(&self, p: &mut fleetbus_config::Problems) {
        p.require(
            self.max_chunk_size > 0 && self.max_chunk_size as usize <= files::MAX_PUBLISH_BYTES,
            "max_chunk_size",
            format!("must be between 1 and {}", files::MAX_PUBLISH_BYTES),
        );
        p.require(
            self.quota_per_agent >= self.max_file_size.min(1 << 20),
            "quota_per_agent",
            "must be at least 1 MiB",
        );
        p.require(
            self.min_chunk_size > 0 && self.min_chunk_size <= self.max_chunk_size,
            "min_chunk_size",
            "must be between 1 and files.max_chunk_size",
        );
        p.require(
            self.max_chunks > 0 && self.max_chunks <= 1 << 24,
            "max_chunks",
            "must be between 1 and 16777216",
        );
        p.require(
            self.max_uploads_per_agent > 0,
            "max_uploads_per_agent",
            "must be at least 1",
        );
        p.require(
            self.persist_every > 0,
            "persist_every",
            "must be at least 1",
        );
        p.require(
            self.ttl >= Duration::from_secs(1),
            "ttl",
            "must be at least 1s",
        );
    }
}

/// The file service's counters (also on the metrics endpoint).
#[derive(Debug, Default)]
pub struct FileCounters {
    /// Uploads started (an `init` for a file not in the spool).
    pub started: AtomicU64,
    /// Chunks written to the spool.
    pub chunks_stored: AtomicU64,
    /// Chunks already held (sent again after a reconnect or a lost reply).
    pub chunks_duplicate: AtomicU64,
    /// Chunks refused (hash, offset, length, unknown upload).
    pub chunks_rejected: AtomicU64,
    /// Chunks shed unread because the file service's queue was full (the agent is told
    /// they were lost when a later chunk arrives, and sends them again).
    pub chunks_shed: AtomicU64,
    /// Chunks reported lost to their agent (a later chunk of the upload arrived first).
    pub chunks_lost: AtomicU64,
    /// Control messages (init, status, finish, abort) shed because the file service's
    /// queue was full (the agent is answered `busy` and asks again).
    pub control_shed: AtomicU64,
    /// Bytes written to the spool.
    pub bytes_stored: AtomicU64,
    /// Files verified and handed to the rules engine.
    pub completed: AtomicU64,
    /// Files every target sink has written (their spool space freed).
    pub delivered: AtomicU64,
    /// Uploads refused: quota, size or manifest.
    pub refused: AtomicU64,
    /// Uploads aborted by their agent.
    pub aborted: AtomicU64,
    /// Uploads removed for inactivity (`files.ttl`).
    pub collected: AtomicU64,
    /// Spool bytes freed by abort and garbage collection.
    pub freed_bytes: AtomicU64,
    /// Messages that could not be decoded or are not allowed from agents.
    pub malformed: AtomicU64,
}

impl FileCounters {
    /// (metric suffix, help, value) of every counter.
    pub fn samples(&self) -> Vec<(&'static str, &'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "uploads_started_total",
                "Uploads started.",
                l(&self.started),
            ),
            (
                "chunks_stored_total",
                "File chunks written to the spool.",
                l(&self.chunks_stored),
            ),
            (
                "chunks_duplicate_total",
                "File chunks received again and already held.",
                l(&self.chunks_duplicate),
            ),
            (
                "chunks_rejected_total",
                "File chunks refused (hash, offset, length, unknown upload).",
                l(&self.chunks_rejected),
            ),
            (
                "chunks_shed_total",
                "File chunks dropped unread because the file service was behind (sent again).",
                l(&self.chunks_shed),
            ),
            (
                "chunks_lost_total",
                "File chunks reported lost to their agent (a later chunk arrived first).",
                l(&self.chunks_lost),
            ),
            (
                "control_shed_total",
                "File control messages (init, status, finish, abort) shed because the file service was behind (the agent is told busy and asks again).",
                l(&self.control_shed),
            ),
            (
                "bytes_stored_total",
                "File bytes written to the spool.",
                l(&self.bytes_stored),
            ),
            (
                "completed_total",
                "Files verified and handed to the rules engine.",
                l(&self.completed),
            ),
            (
                "delivered_total",
                "Files written by every sink they were routed to.",
                l(&self.delivered),
            ),
            (
                "refused_total",
                "Uploads refused (quota, size, manifest).",
                l(&self.refused),
            ),
            (
                "aborted_total",
                "Uploads aborted by their agent.",
                l(&self.aborted),
            ),
            (
                "collected_total",
                "Idle uploads removed after files.ttl.",
                l(&self.collected),
            ),
            (
                "freed_bytes_total",
                "Spool bytes freed by abort and garbage collection.",
                l(&self.freed_bytes),
            ),
            (
                "malformed_total",
                "File messages that could not be decoded or are not allowed.",
                l(&self.malformed),
            ),
        ]
    }
}

/// Messages queued for the file service (chunks are at most 128 KiB: 8 MiB).
pub(crate) const QUEUE_CAPACITY: usize = 64;

/// Chunks shed unread by the engine's consumer whose agent was already told they were lost
/// (agent, file id, index): the file service does not report them a second time.
pub(crate) type ShedChunks =
    Arc<std::sync::Mutex<std::collections::HashSet<(String, String, u32)>>>;

/// Publishes a reply payload to an agent (on `fleet/{agent}/replies/files`).
pub type ReplyPublisher = Arc<dyn Fn(&str, Vec<u8>) + Send + Sync>;

/// What the service thread is fed.
pub(crate) enum FileEvent {
    /// A message published on a file topic.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
    /// Time for housekeeping (deliveries, garbage collection).
    Tick,
}

/// A verified file whose completion message went to sinks that may not have written it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    #[serde(skip)]
    agent: String,
    #[serde(skip)]
    file_id: String,
    index: u64,
    sinks: Vec<String>,
    /// Where each sink puts the file (told to the agent).
    #[serde(default)]
    landed: Vec<String>,
}

/// Most chunks reported lost for one gap: an agent never has more than its window in flight,
/// so a wider gap means it skipped chunks on purpose (held ones) or the state is stale.
const MAX_LOST_REPORTED: usize = 1024;

/// How long a finished upload waits for its completion message to become durable.
const DURABLE_WAIT: Duration = Duration::from_secs(5);

/// The running file service.
pub(crate) struct FileService {
    reassembler: Reassembler,
    root: PathBuf,
    engine: Arc<Engine>,
    reply: ReplyPublisher,
    config: FilesSection,
    counters: Arc<FileCounters>,
    deliveries: Vec<Delivery>,
    last_remember_sweep: Option<Instant>,
    /// Per upload, the index after the highest chunk seen since its last `init`: agents
    /// send the chunks the server lacks in order, so a chunk arriving past a gap of chunks
    /// still not held means those were lost on the way.
    next_expected: HashMap<(String, String), u32>,
    shed: ShedChunks,
    /// Bounds the log lines of refused uploads and chunks (a hostile agent sends them
    /// by the thousand; the counters count them all).
    complaints: fleetbus_support::Throttle,
    /// Bounds the log lines of spool I/O errors (a full disk).
    io_errors: fleetbus_support::Throttle,
}

impl FileService {
    /// Opens the spool under `data_dir/files`, reloading every upload and pending delivery.
    pub(crate) fn open(
        data_dir: &Path,
        config: FilesSection,
        engine: Arc<Engine>,
        reply: ReplyPublisher,
        counters: Arc<FileCounters>,
        shed: ShedChunks,
    ) -> Result<FileService, ChunkError> {
        let root = data_dir.join("files");
        let spool = data_dir.join(fleetbus_sinks::completion::SPOOL_DIR);
        let limits = Limits {
            max_file_size: config.max_file_size,
            quota_per_owner: config.quota_per_agent,
            max_chunk_size: config.max_chunk_size,
            min_chunk_size: config.min_chunk_size,
            max_chunk_count: config.max_chunks,
            max_uploads_per_owner: config.max_uploads_per_agent,
            persist_every: config.persist_every,
        };
        let (reassembler, problems) = Reassembler::open(&spool, limits)?;
        for p in problems {
            tracing::error!(error = %p, "upload left in the spool: its state cannot be read");
        }
        let mut deliveries = Vec::new();
        for (agent, file_id, complete, _) in reassembler.uploads() {
            if !complete {
                continue;
            }
            let path = spool.join(&agent).join(&file_id).join("delivery.json");
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<Delivery>(&bytes) {
                    Ok(d) => deliveries.push(Delivery {
                        agent,
                        file_id,
                        ..d
                    }),
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "unreadable delivery record; the file is announced again when its agent finishes it")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read delivery record")
                }
            }
        }
        if !reassembler.uploads().is_empty() {
            tracing::info!(
                uploads = reassembler.uploads().len(),
                awaiting_sinks = deliveries.len(),
                "file spool reloaded"
            );
        }
        Ok(FileService {
            reassembler,
            root,
            engine,
            reply,
            config,
            counters,
            deliveries,
            last_remember_sweep: None,
            next_expected: HashMap::new(),
            shed,
            complaints: fleetbus_support::Throttle::new(Duration::from_secs(10)),
            io_errors: fleetbus_support::Throttle::new(Duration::from_secs(10)),
        })
    }

    /// Handles events until the channel closes.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<FileEvent>) {
        while let Some(event) = rx.blocking_recv() {
            match event {
                FileEvent::Message { topic, payload } => self.handle(&topic, &payload),
                FileEvent::Tick => self.housekeeping(),
            }
        }
        // leave the held-chunk lists exact for the next start
        for (agent, file_id, complete, _) in self.reassembler.uploads() {
            if !complete {
                let _ = self.reassembler.status(&agent, &file_id);
            }
        }
    }

    fn handle(&mut self, topic: &str, payload: &[u8]) {
        let Topic::Files { agent, rest } = Topic::parse(topic) else {
            return;
        };
        let Some((file_id, action)) = parse_file_rest(rest) else {
            self.malformed(agent, "", format!("{topic}: not a file topic (fleet/{{agent}}/files/{{file_id}}/{{init|chunk|status|finish|abort}})"));
            return;
        };
        let _span = tracing::debug_span!("file", %agent, %file_id).entered();
        let reply = match action {
            FileAction::Init => {
                self.next_expected
                    .remove(&(agent.to_string(), file_id.to_string()));
                self.init(agent, file_id, payload)
            }
            FileAction::Chunk => self.chunk(agent, file_id, payload),
            FileAction::Status => self.status(agent, file_id),
            FileAction::Finish => self.finish(agent, file_id),
            FileAction::Abort => self.abort(agent, file_id),
            FileAction::Complete => {
                self.malformed(
                    agent,
                    file_id,
                    format!("{topic}: completion messages are published by the server only"),
                );
                return;
            }
        };
        self.send(agent, &reply);
    }

    fn send(&self, agent: &str, reply: &FileReply) {
        match files::encode(reply) {
            Ok(bytes) => (self.reply)(agent, bytes),
            Err(e) => tracing::error!(%agent, error = %e, "cannot encode a file reply"),
        }
    }

    fn malformed(&self, agent: &str, file_id: &str, reason: String) {
        let n = self.counters.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(%agent, %reason, malformed_total = n, "file message refused");
        }
        self.send(
            agent,
            &FileReply::Failed {
                file_id: file_id.to_string(),
                kind: RefusalKind::Malformed,
                reason,
            },
        );
    }

    fn tombstone(&self, agent: &str, file_id: &str) -> PathBuf {
        self.root.join("delivered").join(agent).join(file_id)
    }

    /// The manifest of a file already delivered, if it is remembered.
    fn delivered(&self, agent: &str, file_id: &str) -> Option<FileManifest> {
        if fleetbus_protocol::validate_id("agent", agent).is_err()
            || fleetbus_protocol::validate_id("file id", file_id).is_err()
        {
            return None;
        }
        let bytes = std::fs::read(self.tombstone(agent, file_id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn init(&mut self, agent: &str, file_id: &str, payload: &[u8]) -> FileReply {
        let init: FileInit = match fleetbus_protocol::message::decode_as(payload) {
            Ok(i) => i,
            Err(e) => return failed(file_id, RefusalKind::Malformed, format!("init: {e}")),
        };
        if init.manifest.file_id != file_id {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return failed(
                file_id,
                RefusalKind::BadManifest,
                format!(
                    "manifest rejected: file_id `{}` differs from the topic's `{file_id}`",
                    init.manifest.file_id
                ),
            );
        }
        if let Some(m) = self.delivered(agent, file_id) {
            if m == init.manifest {
                return complete_status(&m);
            }
        }
        let existed = self.reassembler.manifest(agent, file_id).is_some();
        match self.reassembler.init(agent, from_wire(init.manifest)) {
            Ok(status) => {
                if !existed {
                    self.counters.started.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%agent, %file_id, chunks = status.chunk_count, "upload started");
                }
                FileReply::Status {
                    file_id: status.file_id,
                    chunk_count: status.chunk_count,
                    held: status.held,
                    complete: status.complete,
                }
            }
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(left_out) = self.complaints.admit() {
                    tracing::warn!(%agent, %file_id, error = %e, similar_not_logged = left_out, "upload refused");
                }
                refusal(file_id, e)
            }
        }
    }

    fn chunk(&mut self, agent: &str, file_id: &str, payload: &[u8]) -> FileReply {
        let chunk: FileChunk<'_> = match rmp_serde::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                self.counters
                    .chunks_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return failed(file_id, RefusalKind::Malformed, format!("chunk: {e}"));
            }
        };
        let index = chunk.index;
        self.report_lost(agent, file_id, index);
        if self.reassembler.manifest(agent, file_id).is_none()
            && self.delivered(agent, file_id).is_some()
        {
            self.counters
                .chunks_duplicate
                .fetch_add(1, Ordering::Relaxed);
            return chunk_reply(file_id, index, ChunkOutcome::Duplicate, None);
        }
        match self.reassembler.put(
            agent,
            file_id,
            index,
            chunk.offset,
            &chunk.data,
            &chunk.sha256,
        ) {
            Ok(PutOutcome::Stored) => {
                self.counters.chunks_stored.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_stored
                    .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                chunk_reply(file_id, index, ChunkOutcome::Stored, None)
            }
            Ok(PutOutcome::Duplicate) => {
                self.counters
                    .chunks_duplicate
                    .fetch_add(1, Ordering::Relaxed);
                chunk_reply(file_id, index, ChunkOutcome::Duplicate, None)
            }
            Err(ChunkError::Rejected(Rejection::UnknownUpload { .. })) => {
                self.counters
                    .chunks_rejected
                    .fetch_add(1, Ordering::Relaxed);
                failed(
                    file_id,
                    RefusalKind::UnknownUpload,
                    format!("chunk {index}: no upload `{file_id}` in progress (send init)"),
                )
            }
            Err(ChunkError::Rejected(r)) => {
                self.counters
                    .chunks_rejected
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(left_out) = self.complaints.admit() {
                    tracing::warn!(%agent, %file_id, index, reason = %r, similar_not_logged = left_out, "chunk rejected");
                }
                chunk_reply(file_id, index, ChunkOutcome::Rejected, Some(r.to_string()))
            }
            Err(e) => {
                if let Some(left_out) = self.io_errors.admit() {
                    tracing::error!(%agent, %file_id, index, error = %e, similar_not_logged = left_out, "cannot store a chunk");
                }
                failed(file_id, RefusalKind::Busy, e.to_string())
            }
        }
    }

    /// Tells the agent about chunks sent before `index` that never arrived (see
    /// `next_expected`), so it sends them again now instead of after its reply timeout.
    fn report_lost(&mut self, agent: &str, file_id: &str, index: u32) {
        let Some(count) = self
            .reassembler
            .manifest(agent, file_id)
            .map(|m| m.chunk_count)
        else {
            return;
        };
        if index >= count {
            return; // refused as out of range, says nothing about the others
        }
        let key = (agent.to_string(), file_id.to_string());
        let Some(next) = self.next_expected.get(&key).copied() else {
            self.next_expected.insert(key, index + 1);
            return;
        };
        if index < next {
            return; // a chunk sent again
        }
        self.next_expected.insert(key, index.saturating_add(1));
        let mut shed = self.shed.lock().unwrap_or_else(|p| p.into_inner());
        let lost: Vec<u32> = (next..index)
            .filter(|&i| !self.reassembler.holds(agent, file_id, i))
            .filter(|&i| !shed.remove(&(agent.to_string(), file_id.to_string(), i)))
            .take(MAX_LOST_REPORTED)
            .collect();
        drop(shed);
        for i in lost {
            self.counters.chunks_lost.fetch_add(1, Ordering::Relaxed);
            let reason = format!("chunk {i} never arrived (chunk {index} did)");
            self.send(
                agent,
                &chunk_reply(file_id, i, ChunkOutcome::Lost, Some(reason)),
            );
        }
    }

    fn status(&mut self, agent: &str, file_id: &str) -> FileReply {
        if self.reassembler.manifest(agent, file_id).is_none() {
            if let Some(m) = self.delivered(agent, file_id) {
                return complete_status(&m);
            }
        }
        match self.reassembler.status(agent, file_id) {
            Ok(s) => FileReply::Status {
                file_id: s.file_id,
                chunk_count: s.chunk_count,
                held: s.held,
                complete: s.complete,
            },
            Err(e) => refusal(file_id, e),
        }
    }

    fn finish(&mut self, agent: &str, file_id: &str) -> FileReply {
        if self.reassembler.manifest(agent, file_id).is_none() {
            if let Some(m) = self.delivered(agent, file_id) {
                return FileReply::Complete {
                    file_id: file_id.to_string(),
                    size: m.size,
                    sha256: m.sha256,
                    landed: Vec::new(),
                };
            }
        }
        let completed = match self.reassembler.finish(agent, file_id) {
            Ok(c) => c,
            Err(e) => {
                if let Some(left_out) = self.complaints.admit() {
                    tracing::warn!(%agent, %file_id, error = %e, similar_not_logged = left_out, "upload not finished");
                }
                return refusal(file_id, e);
            }
        };
        let done = |landed: &[String]| FileReply::Complete {
            file_id: file_id.to_string(),
            size: completed.manifest.size,
            sha256: completed.manifest.sha256.clone(),
            landed: landed.to_vec(),
        };
        if let Some(d) = self
            .deliveries
            .iter()
            .find(|d| d.agent == agent && d.file_id == file_id)
        {
            // announced before (the agent did not get our answer): wait for it again
            return self.when_durable(d.index, done(&d.landed), file_id);
        }
        let message = FileCompleted {
            agent: agent.to_string(),
            kind: "file".into(),
            file: to_wire(&completed.manifest),
            spool: format!("{agent}/{file_id}/data"),
            ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let payload = match serde_json::to_vec(&message) {
            Ok(p) => p,
            Err(e) => return failed(file_id, RefusalKind::Busy, e.to_string()),
        };
        let topic = files::file_topic(agent, file_id, FileAction::Complete);
        match self.engine.dispatch_routed(&topic, &payload) {
            Dispatched::Appended { index, sinks } => {
                let landed = self.engine.file_destinations(&topic, &payload, &sinks);
                let delivery = Delivery {
                    agent: agent.to_string(),
                    file_id: file_id.to_string(),
                    index,
                    sinks,
                    landed,
                };
                let path = completed.path.with_file_name("delivery.json");
                if let Err(e) = write_json(&path, &delivery) {
                    // the completion is in the log; without the record the file would be
                    // announced again after a restart (sinks overwrite: no harm)
                    tracing::error!(file = %path.display(), error = %e, "cannot save the delivery record");
                }
                self.counters.completed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%agent, %file_id, name = %completed.manifest.name, size = completed.manifest.size, sinks = ?delivery.sinks, "file verified and routed");
                let done = done(&delivery.landed);
                self.deliveries.push(delivery);
                self.when_durable(index, done, file_id)
            }
            Dispatched::Unrouted => {
                tracing::warn!(%agent, %file_id, "file verified, but no rule routes file completions ({}): kept in the spool for files.ttl, the agent keeps its copy", files::ALL_FILE_COMPLETIONS);
                failed(
                    file_id,
                    RefusalKind::Busy,
                    format!("verified, but no rule on the server routes file completions ({}); the agent keeps its copy and asks again later", files::ALL_FILE_COMPLETIONS),
                )
            }
            other => failed(
                file_id,
                RefusalKind::Busy,
                format!("verified, but the rules engine did not accept its completion ({other:?}); ask again later"),
            ),
        }
    }

    /// `reply` once log entry `index` is durable (else: busy, ask again).
    fn when_durable(&self, index: u64, reply: FileReply, file_id: &str) -> FileReply {
        let started = Instant::now();
        while self.engine.durable() <= index {
            if started.elapsed() > DURABLE_WAIT {
                return failed(
                    file_id,
                    RefusalKind::Busy,
                    "verified; the completion message is not durable yet: ask again".into(),
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        reply
    }

    fn abort(&mut self, agent: &str, file_id: &str) -> FileReply {
        if self
            .deliveries
            .iter()
            .any(|d| d.agent == agent && d.file_id == file_id)
        {
            // verified and routed: the sinks need the file; nothing to abort
            return self.finish(agent, file_id);
        }
        match self.reassembler.remove(agent, file_id) {
            Ok(freed) => {
                if let Some(bytes) = freed {
                    self.counters.aborted.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .freed_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                    tracing::info!(%agent, %file_id, bytes, "upload aborted; spool freed");
                }
                FileReply::Aborted {
                    file_id: file_id.to_string(),
                }
            }
            Err(e) => refusal(file_id, e),
        }
    }

    /// Frees the spool of delivered files, collects idle uploads, forgets old deliveries.
    fn housekeeping(&mut self) {
        let mut still = Vec::new();
        for d in std::mem::take(&mut self.deliveries) {
            let written = d.sinks.iter().all(|s| {
                self.engine
                    .sink_position(s)
                    .is_none_or(|position| position > d.index)
            });
            if written {
                self.delivered_done(&d);
            } else {
                still.push(d);
            }
        }
        self.deliveries = still;
        let reassembler = &self.reassembler;
        self.next_expected
            .retain(|(agent, file_id), _| reassembler.manifest(agent, file_id).is_some());
        self.shed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(agent, file_id, _)| reassembler.manifest(agent, file_id).is_some());

        let now = SystemTime::now();
        match self.reassembler.gc(self.config.ttl, now) {
            Ok(report) => {
                if !report.removed.is_empty() {
                    self.counters
                        .collected
                        .fetch_add(report.removed.len() as u64, Ordering::Relaxed);
                    self.counters
                        .freed_bytes
                        .fetch_add(report.bytes, Ordering::Relaxed);
                    tracing::info!(uploads = ?report.removed, bytes = report.bytes, ttl = ?self.config.ttl, "idle uploads removed from the spool");
                }
            }
            Err(e) => tracing::error!(error = %e, "spool garbage collection failed"),
        }
        // verified files no rule took (no delivery): removed after the same idle time
        let orphans: Vec<_> = self
            .reassembler
            .uploads()
            .into_iter()
            .filter(|(a, f, complete, updated)| {
                *complete
                    && now.duration_since(*updated).unwrap_or_default() >= self.config.ttl
                    && !self
                        .deliveries
                        .iter()
                        .any(|d| &d.agent == a && &d.file_id == f)
            })
            .collect();
        for (agent, file_id, _, _) in orphans {
            if let Ok(Some(bytes)) = self.reassembler.remove(&agent, &file_id) {
                self.counters.collected.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .freed_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
                tracing::warn!(%agent, %file_id, bytes, "verified file no rule routed removed after files.ttl");
            }
        }
        if self
            .last_remember_sweep
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(600))
        {
            self.last_remember_sweep = Some(Instant::now());
            forget_older_than(&self.root.join("delivered"), self.config.remember);
        }
    }

    fn delivered_done(&mut self, d: &Delivery) {
        let manifest = self.reassembler.manifest(&d.agent, &d.file_id).map(to_wire);
        if let Some(m) = manifest {
            let path = self.tombstone(&d.agent, &d.file_id);
            if let Err(e) = write_json(&path, &m) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remember a delivered file (uploading it again sends it again)");
            }
        }
        match self.reassembler.remove(&d.agent, &d.file_id) {
            Ok(_) => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(agent = %d.agent, file_id = %d.file_id, sinks = ?d.sinks, "file delivered; spool freed");
            }
            Err(e) => {
                tracing::error!(agent = %d.agent, file_id = %d.file_id, error = %e, "cannot free the spool of a delivered file")
            }
        }
    }
}

/// Starts the file service thread and its housekeeping ticker; returns the channel that
/// feeds it and the thread.
///
/// The queue holds at most [`QUEUE_CAPACITY`] messages; chunks arriving while it is full
/// are shed (see [`FileCounters::chunks_shed`]), which bounds the memory pinned by a
/// file service that is behind.
#[allow(clippy::type_complexity)]
pub(crate) fn spawn(
    service: FileService,
    tick: Duration,
    stop: crate::shutdown::StopSignal,
) -> std::io::Result<(
    mpsc::Sender<FileEvent>,
    std::thread::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
)> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let span = tracing::info_span!("files");
    let thread = std::thread::Builder::new()
        .name("fleetbus-files".into())
        .spawn(move || span.in_scope(|| service.run(rx)))?;
    let ticker = crate::ticker::spawn(tx.clone(), tick, || FileEvent::Tick, stop);
    Ok((tx, thread, ticker))
}

fn failed(file_id: &str, kind: RefusalKind, reason: String) -> FileReply {
    FileReply::Failed {
        file_id: file_id.to_string(),
        kind,
        reason,
    }
}

fn chunk_reply(
    file_id: &str,
    index: u32,
    outcome: ChunkOutcome,
    reason: Option<String>,
) -> FileReply {
    FileReply::Chunk {
        file_id: file_id.to_string(),
        index,
        outcome,
        reason,
    }
}

fn complete_status(m: &FileManifest) -> FileReply {
    FileReply::Status {
        file_id: m.file_id.clone(),
        chunk_count: m.chunk_count,
        held: if m.chunk_count > 0 {
            vec![(0, m.chunk_count - 1)]
        } else {
            Vec::new()
        },
        complete: true,
    }
}

/// The reply for a chunker error: what the agent should do about it.
fn refusal(file_id: &str, e: ChunkError) -> FileReply {
    let kind = match &e {
        ChunkError::Rejected(r) => match r {
            Rejection::UnknownUpload { .. } => RefusalKind::UnknownUpload,
            Rejection::QuotaExceeded { .. } | Rejection::TooManyUploads { .. } => {
                RefusalKind::Quota
            }
            Rejection::Incomplete { .. } => RefusalKind::Incomplete,
            Rejection::FileHash { .. } => RefusalKind::FileHash,
            Rejection::IndexOutOfRange { .. }
            | Rejection::Offset { .. }
            | Rejection::Length { .. }
            | Rejection::ChunkHash { .. } => RefusalKind::BadChunk,
            Rejection::Manifest(_)
            | Rejection::Owner(_)
            | Rejection::TooLarge { .. }
            | Rejection::ManifestConflict(_) => RefusalKind::BadManifest,
        },
        ChunkError::Io { .. } | ChunkError::State { .. } => RefusalKind::Busy,
    };
    failed(file_id, kind, e.to_string())
}

/// The chunker's manifest from its wire form.
fn from_wire(m: FileManifest) -> Manifest {
    Manifest {
        file_id: m.file_id,
        name: m.name,
        size: m.size,
        sha256: m.sha256,
        chunk_size: m.chunk_size,
        chunk_count: m.chunk_count,
        content_type: m.content_type,
        meta: m.meta,
    }
}

/// The wire form of the chunker's manifest.
fn to_wire(m: &Manifest) -> FileManifest {
    FileManifest {
        file_id: m.file_id.clone(),
        name: m.name.clone(),
        size: m.size,
        sha256: m.sha256.clone(),
        chunk_size: m.chunk_size,
        chunk_count: m.chunk_count,
        content_type: m.content_type.clone(),
        meta: m.meta.clone(),
    }
}

/// Writes `value` as JSON to `path` (creating its directory), via a temporary file and a
/// rename so it is never half written.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    fleetbus_sinks::write_atomically(path, &bytes).map_err(std::io::Error::other)
}

/// Deletes delivery notes older than `age` under `dir/{agent}/`.
fn forget_older_than(dir: &Path, age: Duration) {
    let Ok(agents) = std::fs::read_dir(dir) else {
        return;
    };
    for agent in agents.flatten() {
        let Ok(notes) = std::fs::read_dir(agent.path()) else {
            continue;
        };
        for note in notes.flatten() {
            let old = note
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|e| e >= age);
            if old {
                let _ = std::fs::remove_file(note.path());
            }
        }
    }
}
