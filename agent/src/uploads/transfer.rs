//! Sending one queued file over the agent's connection, interleaved with telemetry.
//!
//! ```text
//! init ──▶ Status{held} ──▶ chunks not held, at most `window` unanswered, paced by
//!          ▲                `max_bytes_per_sec` ──▶ every chunk answered ──▶ finish
//!          │                                                                  │
//!          └── reconnect / silence for `reply_timeout` / Incomplete ◀─────────┤
//!                                                  Complete ◀─────────────────┘
//! ```
//!
//! Every connection starts the current upload again with `init`: the server answers which
//! chunks it holds, so after a disconnect, an agent restart or a server restart only the
//! missing chunks travel. Chunks are read and hashed off the async workers, a window
//! ahead, so the file is never in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbus_chunker::Splitter;
use fleetbus_protocol::files::{self, FileAction};
use fleetbus_protocol::{ChunkOutcome, FileChunk, FileInit, FileReply, RefusalKind};
use rumqttc::{AsyncClient, ClientError, QoS, Request};
use tokio::sync::mpsc;

use crate::config::UploadsConfig;
use crate::uploads::queue::{UploadJob, UploadOutcome, UploadProgress, UploadQueue};

/// A chunk read, hashed and encoded by the reader: (index, chunk message payload).
type Prepared = Result<(u32, Vec<u8>), String>;

/// Attempts for one chunk the server keeps rejecting before the upload fails.
const MAX_CHUNK_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `init` sent, waiting for the server's status.
    Asking,
    /// Sending the chunks the server lacks.
    Sending,
    /// `finish` sent, waiting for the verdict.
    Finishing,
    /// The server is busy or over quota: ask again at the deadline.
    Waiting,
}

struct Transfer {
    job: UploadJob,
    splitter: Arc<Splitter>,
    phase: Phase,
    deadline: Instant,
    reader: Option<mpsc::Receiver<Prepared>>,
    /// Prepared chunks the client could not take yet, oldest first.
    stash: VecDeque<(u32, Vec<u8>)>,
    unanswered: usize,
    reader_done: bool,
    held: u32,
    rejected: HashMap<u32, u32>,
    retry_delay: Duration,
}

/// Drives the queue's uploads over one connection at a time.
pub(crate) struct FileSender {
    agent: String,
    queue: Arc<UploadQueue>,
    config: UploadsConfig,
    current: Option<Transfer>,
    /// Earliest time the next chunk may go (bandwidth limit).
    next_send: Instant,
}

impl FileSender {
    pub(crate) fn new(agent: &str, queue: Arc<UploadQueue>, config: UploadsConfig) -> Self {
        FileSender {
            agent: agent.to_string(),
            queue,
            config,
            current: None,
            next_send: Instant::now(),
        }
    }

    /// The topic the server answers on.
    pub(crate) fn replies_topic(&self) -> String {
        files::file_replies(&self.agent)
    }

    /// A new connection: the upload in progress starts over with `init` (the server says
    /// what it already holds), or the next queued one starts.
    pub(crate) fn on_connected(&mut self, client: &AsyncClient) {
        if let Some(t) = self.current.as_mut() {
            t.reader = None;
            t.stash.clear();
            t.unanswered = 0;
            t.retry_delay = self.config.retry_min;
        }
        if self.current.is_some() {
            self.send_init(client);
        } else {
            self.start_next(client);
        }
    }

    /// True when nothing is being uploaded.
    pub(crate) fn idle(&self) -> bool {
        self.current.is_none()
    }

    /// Starts the oldest queued upload if none is running.
    pub(crate) fn start_next(&mut self, client: &AsyncClient) {
        if self.current.is_some() {
            return;
        }
        while let Some(job) = self.queue.next() {
            match self.open(job.clone()) {
                Ok(t) => {
                    tracing::info!(file = %job.path.display(), file_id = %job.manifest.file_id, size = job.manifest.size, chunks = job.manifest.chunk_count, "upload starting");
                    self.current = Some(t);
                    self.send_init(client);
                    return;
                }
                Err(reason) => self.queue.finish(
                    &job,
                    UploadOutcome::Failed {
                        manifest: job.manifest.clone(),
                        reason,
                    },
                ),
            }
        }
    }

    fn open(&self, job: UploadJob) -> Result<Transfer, String> {
        let topic = files::file_topic(&self.agent, &job.manifest.file_id, FileAction::Chunk);
        let max = files::max_chunk_data(&topic);
        if job.manifest.chunk_size as usize > max {
            return Err(format!(
                "chunk size {} does not fit one {}-byte publish on {topic} (at most {max})",
                job.manifest.chunk_size,
                files::MAX_PUBLISH_BYTES
            ));
        }
        let splitter = Splitter::open(&job.path, job.manifest.clone())
            .map_err(|e| format!("{e} (changed or removed since it was queued)"))?;
        Ok(Transfer {
            job,
            splitter: Arc::new(splitter),
            phase: Phase::Asking,
            deadline: Instant::now(),
            reader: None,
            stash: VecDeque::new(),
            unanswered: 0,
            reader_done: false,
            held: 0,
            rejected: HashMap::new(),
            retry_delay: self.config.retry_min,
        })
    }

    fn publish(&self, client: &AsyncClient, action: FileAction, payload: Vec<u8>) -> bool {
        let Some(t) = &self.current else {
            return false;
        };
        let topic = files::file_topic(&self.agent, &t.job.manifest.file_id, action);
        client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
    }

    fn send_init(&mut self, client: &AsyncClient) {
        let Some(t) = &self.current else {
            return;
        };
        let init = FileInit {
            manifest: t.job.manifest.clone(),
        };
        let sent = match files::encode(&init) {
            Ok(p) => self.publish(client, FileAction::Init, p),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an upload's init");
                false
            }
        };
        self.expect(Phase::Asking, sent);
    }

    fn send_finish(&mut self, client: &AsyncClient) {
        let sent = self.publish(client, FileAction::Finish, Vec::new());
        self.expect(Phase::Finishing, sent);
    }

    /// Enters `phase`, expecting an answer within the reply timeout (or, when the message
    /// could not be handed to the client, trying again shortly).
    fn expect(&mut self, phase: Phase, sent: bool) {
        let timeout = self.config.reply_timeout;
        if let Some(t) = self.current.as_mut() {
            t.phase = phase;
            t.deadline = Instant::now()
                + if sent {
                    timeout
                } else {
                    Duration::from_millis(50)
                };
        }
    }

    /// True when a prepared chunk may be sent now (window and bandwidth permitting).
    pub(crate) fn wants_chunk(&self) -> bool {
        self.current.as_ref().is_some_and(|t| {
            t.phase == Phase::Sending
                && t.stash.is_empty()
                && t.reader.is_some()
                && t.unanswered < self.config.window
        }) && Instant::now() >= self.next_send
    }

    /// The next prepared chunk (pending forever when there is none to wait for).
    pub(crate) async fn next_chunk(&mut self) -> Option<Prepared> {
        match self.current.as_mut().and_then(|t| t.reader.as_mut()) {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Sends a prepared chunk (or handles the reader's end or failure).
    pub(crate) fn on_prepared(&mut self, prepared: Option<Prepared>, client: &AsyncClient) {
        match prepared {
            Some(Ok(chunk)) => self.send_chunk(chunk, client),
            Some(Err(reason)) => self.fail(reason),
            None => {
                if let Some(t) = self.current.as_mut() {
                    t.reader = None;
                    t.reader_done = true;
                }
                self.maybe_finish(client);
            }
        }
    }

    /// Hands a chunk to the client; when its queue is full the chunk is stashed (at the front
    /// when it came from the stash, so chunks keep their order).
    fn send_chunk(&mut self, (index, payload): (u32, Vec<u8>), client: &AsyncClient) {
        self.send_chunk_from(index, payload, false, client)
    }

    fn send_chunk_from(
        &mut self,
        index: u32,
        payload: Vec<u8>,
        from_stash: bool,
        client: &AsyncClient,
    ) {
        let Some(t) = self.current.as_ref() else {
            return;
        };
        let topic = files::file_topic(&self.agent, &t.job.manifest.file_id, FileAction::Chunk);
        let len = payload.len() as u64;
        match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
            Ok(()) => {
                let stats = self.queue.stats();
                stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
                stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
                if let Some(rate) = self.config.max_bytes_per_sec.filter(|r| *r > 0) {
                    // token bucket carrying at most 100 ms of unused allowance
                    let cost = Duration::from_secs_f64(len as f64 / rate as f64);
                    let now = Instant::now();
                    let floor = now.checked_sub(Duration::from_millis(100)).unwrap_or(now);
                    self.next_send = self.next_send.max(floor) + cost;
                }
                let timeout = self.config.reply_timeout;
                if let Some(t) = self.current.as_mut() {
                    t.unanswered += 1;
                    t.deadline = Instant::now() + timeout;
                }
            }
            Err(
                ClientError::TryRequest(Request::Publish(p))
                | ClientError::Request(Request::Publish(p)),
            ) => {
                // the client's queue is full (telemetry is flowing): keep it for a moment
                if let Some(t) = self.current.as_mut() {
                    let chunk = (index, p.payload.to_vec());
                    match from_stash {
                        true => t.stash.push_front(chunk),
                        false => t.stash.push_back(chunk),
                    }
                }
            }
            Err(_) => {
                // cannot happen for a publish; the reply timeout would ask the server again
                tracing::debug!(index, "chunk not handed to the client");
            }
        }
    }

    /// When the sender next needs the timer: a reply deadline, a retry, the bandwidth
    /// limit or a stashed chunk.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let t = self.current.as_ref()?;
        let mut at = t.deadline;
        if t.phase == Phase::Sending {
            if !t.stash.is_empty() {
                at = at.min(Instant::now() + Duration::from_millis(2));
            } else if t.reader.is_some() && t.unanswered < self.config.window {
                at = at.min(self.next_send.max(Instant::now()));
            }
        }
        Some(at)
    }

    /// The timer fired: send a stashed chunk, or ask the server again after silence.
    pub(crate) fn on_timer(&mut self, client: &AsyncClient) {
        let Some(t) = self.current.as_mut() else {
            return;
        };
        if let Some((index, payload)) = t.stash.pop_front() {
            self.send_chunk_from(index, payload, true, client);
            return;
        }
        if Instant::now() < t.deadline {
            return;
        }
        match t.phase {
            Phase::Asking | Phase::Sending | Phase::Waiting => {
                if t.phase != Phase::Waiting {
                    tracing::info!(file_id = %t.job.manifest.file_id, "no answer from the server about the upload: asking where it stands");
                }
                t.reader = None;
                t.unanswered = 0;
                self.send_init(client);
            }
            Phase::Finishing => self.send_finish(client),
        }
    }

    /// Handles a reply from the server.
    pub(crate) fn on_reply(&mut self, payload: &[u8], client: &AsyncClient) {
        let reply: FileReply = match fleetbus_protocol::message::decode_as(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable file reply ignored");
                return;
            }
        };
        let Some(t) = self.current.as_mut() else {
            return;
        };
        if reply.file_id() != t.job.manifest.file_id {
            return; // about an upload this run no longer sends
        }
        match reply {
            FileReply::Status {
                held,
                complete,
                chunk_count,
                ..
            } => {
                if t.phase != Phase::Asking {
                    return; // a late answer: the next `init` brings a fresh one
                }
                if chunk_count != t.job.manifest.chunk_count {
                    let reason = format!(
                        "the server describes the upload with {chunk_count} chunks, the file has {}",
                        t.job.manifest.chunk_count
                    );
                    return self.fail(reason);
                }
                t.held = held.iter().map(|(lo, hi)| hi - lo + 1).sum();
                t.retry_delay = self.config.retry_min;
                if complete {
                    return self.send_finish(client);
                }
                let missing = missing(&held, chunk_count);
                tracing::debug!(file_id = %t.job.manifest.file_id, held = t.held, missing = missing.len(), "server status");
                self.progress();
                if missing.is_empty() {
                    return self.send_finish(client);
                }
                let Some(t) = self.current.as_mut() else {
                    return;
                };
                t.reader = Some(spawn_reader(
                    t.splitter.clone(),
                    self.agent.clone(),
                    missing,
                    self.config.window,
                ));
                t.reader_done = false;
                t.unanswered = 0;
                t.phase = Phase::Sending;
                t.deadline = Instant::now() + self.config.reply_timeout;
            }
            FileReply::Chunk {
                index,
                outcome,
                reason,
                ..
            } => {
                if t.phase != Phase::Sending {
                    return;
                }
                t.unanswered = t.unanswered.saturating_sub(1);
                t.deadline = Instant::now() + self.config.reply_timeout;
                match outcome {
                    ChunkOutcome::Stored | ChunkOutcome::Duplicate => {
                        t.held += 1;
                        self.progress();
                        self.maybe_finish(client);
                    }
                    ChunkOutcome::Lost => {
                        tracing::debug!(file_id = %t.job.manifest.file_id, index, "chunk lost on the way: sending it again");
                        self.resend(index, client);
                    }
                    ChunkOutcome::Rejected => {
                        let attempts = t.rejected.entry(index).or_insert(0);
                        *attempts += 1;
                        let reason = reason.unwrap_or_default();
                        if *attempts >= MAX_CHUNK_ATTEMPTS {
                            return self.fail(format!(
                                "chunk {index} rejected {MAX_CHUNK_ATTEMPTS} times: {reason}"
                            ));
                        }
                        tracing::warn!(file_id = %t.job.manifest.file_id, index, %reason, "chunk rejected by the server: sending it again");
                        self.resend(index, client);
                    }
                }
            }
            FileReply::Complete {
                sha256,
                size,
                landed,
                ..
            } => {
                if sha256 != t.job.manifest.sha256 || size != t.job.manifest.size {
                    let reason = format!(
                        "the server confirmed {size} bytes with SHA-256 {sha256}, the file has {} bytes with {}",
                        t.job.manifest.size, t.job.manifest.sha256
                    );
                    return self.fail(reason);
                }
                tracing::info!(file = %t.job.path.display(), file_id = %t.job.manifest.file_id, ?landed, "upload confirmed by the server");
                let job = t.job.clone();
                self.current = None;
                self.queue.finish(
                    &job,
                    UploadOutcome::Confirmed {
                        manifest: job.manifest.clone(),
                        landed,
                    },
                );
                self.start_next(client);
            }
            FileReply::Aborted { .. } => {
                self.fail("aborted on the server".into());
            }
            FileReply::Failed { kind, reason, .. } => self.on_refusal(kind, reason, client),
        }
    }

    /// Reads chunk `index` again and sends it (counted as re-sent).
    fn resend(&mut self, index: u32, client: &AsyncClient) {
        let Some(t) = self.current.as_ref() else {
            return;
        };
        self.queue
            .stats()
            .chunks_resent
            .fetch_add(1, Ordering::Relaxed);
        match prepare(&t.splitter, index) {
            Ok(chunk) => self.send_chunk(chunk, client),
            Err(e) => self.fail(e),
        }
    }

    fn on_refusal(&mut self, kind: RefusalKind, reason: String, client: &AsyncClient) {
        let Some(t) = self.current.as_mut() else {
            return;
        };
        let file_id = t.job.manifest.file_id.clone();
        match kind {
            RefusalKind::UnknownUpload | RefusalKind::Incomplete | RefusalKind::FileHash => {
                if t.phase == Phase::Asking {
                    return; // already asking again
                }
                tracing::info!(%file_id, %reason, "the server asks for the upload again");
                t.reader = None;
                t.unanswered = 0;
                self.send_init(client);
            }
            RefusalKind::Quota | RefusalKind::Busy => {
                let wait = t.retry_delay;
                t.retry_delay = (t.retry_delay * 2).min(self.config.retry_max);
                t.reader = None;
                t.unanswered = 0;
                t.phase = Phase::Waiting;
                t.deadline = Instant::now() + wait;
                tracing::warn!(%file_id, %reason, retry_in = ?wait, "upload refused for now");
            }
            RefusalKind::BadChunk | RefusalKind::BadManifest | RefusalKind::Malformed => {
                self.fail(reason);
            }
        }
    }

    fn maybe_finish(&mut self, client: &AsyncClient) {
        let Some(t) = &self.current else {
            return;
        };
        if t.phase == Phase::Sending && t.reader_done && t.unanswered == 0 && t.stash.is_empty() {
            self.send_finish(client);
        }
    }

    fn fail(&mut self, reason: String) {
        if let Some(t) = self.current.take() {
            let manifest = t.job.manifest.clone();
            self.queue
                .finish(&t.job, UploadOutcome::Failed { manifest, reason });
        }
    }

    fn progress(&self) {
        if let Some(t) = &self.current {
            self.queue.set_progress(UploadProgress {
                file_id: t.job.manifest.file_id.clone(),
                held: t.held.min(t.job.manifest.chunk_count),
                total: t.job.manifest.chunk_count,
                chunk_size: t.job.manifest.chunk_size,
                size: t.job.manifest.size,
            });
        }
    }
}

/// Indexes not in `held`, ascending.
fn missing(held: &[(u32, u32)], count: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &(lo, hi) in held {
        out.extend(next..lo.min(count));
        next = next.max(hi.saturating_add(1));
    }
    out.extend(next..count);
    out
}

/// Reads, hashes and encodes chunk `index`.
fn prepare(splitter: &Splitter, index: u32) -> Result<(u32, Vec<u8>), String> {
    let chunk = splitter
        .chunk(index)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("chunk {index} is beyond the end of the file"))?;
    let message = FileChunk {
        index,
        offset: chunk.offset,
        sha256: chunk.sha256.as_str().into(),
        data: chunk.data.as_slice().into(),
    };
    files::encode(&message)
        .map(|p| (index, p))
        .map_err(|e| e.to_string())
}

/// Prepares `indexes` on a blocking thread, at most `window` ahead of the sender.
fn spawn_reader(
    splitter: Arc<Splitter>,
    agent: String,
    indexes: Vec<u32>,
    window: usize,
) -> mpsc::Receiver<Prepared> {
    let (tx, rx) = mpsc::channel(window.max(1));
    let span = tracing::debug_span!("upload_reader", %agent);
    tokio::task::spawn_blocking(move || {
        let _s = span.entered();
        for index in indexes {
            let prepared = prepare(&splitter, index);
            let failed = prepared.is_err();
            if tx.blocking_send(prepared).is_err() || failed {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::missing;

    #[test]
    fn missing_is_the_complement_of_held() {
        assert_eq!(missing(&[], 3), vec![0, 1, 2]);
        assert_eq!(missing(&[(0, 2)], 3), Vec::<u32>::new());
        assert_eq!(missing(&[(1, 1), (3, 4)], 6), vec![0, 2, 5]);
    }
}
