//! The file service itself: one thread, fed by [`super::queue`], that answers every file
//! message, reassembles and verifies uploads in the spool, hands a verified file's
//! completion to the rules engine and frees the spool once its sinks have written it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fleetbus_chunker::{spool, ChunkError, Limits, PutOutcome, Reassembler, Rejection};
use fleetbus_pipeline::{Dispatched, Engine};
use fleetbus_protocol::files::{self, parse_file_rest, FileAction};
use fleetbus_protocol::{
    ChunkOutcome, FileChunk, FileCompleted, FileInit, FileManifest, FileReply, RefusalKind, Topic,
};
use fleetbus_support::Publisher;
use tokio::sync::mpsc;

use super::delivery::{forget_older_than, write_json, Delivery, DELIVERY_FILE};
use super::queue::{reply_to, FileEvent, ShedChunks};
use super::replies::{chunk_reply, complete_status, failed, refusal};
use super::{FileCounters, FilesSection};

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
    publisher: Publisher,
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
        publisher: Publisher,
        counters: Arc<FileCounters>,
        shed: ShedChunks,
    ) -> Result<FileService, ChunkError> {
        let root = data_dir.join("files");
        let spool = spool::spool_dir(data_dir);
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
            let path = spool::upload_dir(&spool, &agent, &file_id).join(DELIVERY_FILE);
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
            publisher,
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
        reply_to(&self.publisher, agent, reply);
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
        match self.reassembler.init(agent, init.manifest) {
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
        let chunk: FileChunk<'_> = match fleetbus_protocol::message::from_msgpack(payload) {
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
            file: completed.manifest.clone(),
            spool: spool::relative_data_path(agent, file_id),
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
                let path = completed.path.with_file_name(DELIVERY_FILE);
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
        let manifest = self.reassembler.manifest(&d.agent, &d.file_id).cloned();
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
