//! The file service's queue: the link consumer offers every file message without waiting
//! (telemetry shares the consumer); what does not fit is shed and its agent told at once,
//! so the memory a file service that is behind pins stays bounded.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetbus_protocol::{files as file_topics, Topic};
use fleetbus_support::Publisher;
use tokio::sync::mpsc;

use super::service::FileService;
use super::FileCounters;

/// Messages queued for the file service (chunks are at most 128 KiB: 8 MiB).
pub(crate) const QUEUE_CAPACITY: usize = 64;

/// Chunks shed unread by the engine's consumer whose agent was already told they were lost
/// (agent, file id, index): the file service does not report them a second time.
pub(crate) type ShedChunks =
    Arc<std::sync::Mutex<std::collections::HashSet<(String, String, u32)>>>;

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

/// Most shed chunks remembered as reported (beyond, a chunk may be reported lost twice and
/// sent once more than needed).
const MAX_SHED_REMEMBERED: usize = 65_536;

/// What the link consumer holds of the file service: its queue, and what it needs to shed
/// a message the queue has no room for.
pub(crate) struct FileQueue {
    /// The service's queue.
    pub(crate) tx: mpsc::Sender<FileEvent>,
    /// Counts what is shed.
    pub(crate) counters: Arc<FileCounters>,
    /// Tells an agent its message was shed.
    pub(crate) publisher: Publisher,
    /// Shed chunks already reported lost (the service does not report them again).
    pub(crate) shed: ShedChunks,
}

impl FileQueue {
    /// Hands a file message to the service without waiting: the consumer that calls it
    /// also carries telemetry. A message the queue has no room for is shed and its agent
    /// told at once (a chunk: lost, sent again; anything else: busy, asked again).
    pub(crate) fn offer(&self, topic: &str, payload: Bytes, chunk: bool) {
        let event = FileEvent::Message {
            topic: topic.to_string(),
            payload,
        };
        match self.tx.try_send(event) {
            Err(mpsc::error::TrySendError::Full(FileEvent::Message { topic, payload })) => {
                match chunk {
                    true => self.shed_chunk(&topic, &payload),
                    false => self.shed_control(&topic),
                }
            }
            Err(mpsc::error::TrySendError::Full(FileEvent::Tick)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("file service stopped; file message dropped");
            }
            Ok(()) => {}
        }
    }

    /// Drops a chunk the file service has no room for and tells its agent at once that it
    /// was lost, so it is sent again.
    fn shed_chunk(&self, topic: &str, payload: &[u8]) {
        self.counters.chunks_shed.fetch_add(1, Ordering::Relaxed);
        let Topic::Files { agent, rest } = Topic::parse(topic) else {
            return;
        };
        let Some((file_id, _)) = file_topics::parse_file_rest(rest) else {
            return;
        };
        // an undecodable chunk is dropped silently: the file service would only refuse it
        let Ok(chunk) =
            fleetbus_protocol::message::from_msgpack::<fleetbus_protocol::FileChunk<'_>>(payload)
        else {
            return;
        };
        let reply = fleetbus_protocol::FileReply::Chunk {
            file_id: file_id.to_string(),
            index: chunk.index,
            outcome: fleetbus_protocol::ChunkOutcome::Lost,
            reason: Some("the server is busy: chunk shed unread".into()),
        };
        let mut reported = self.shed.lock().unwrap_or_else(|p| p.into_inner());
        if reported.len() < MAX_SHED_REMEMBERED {
            reported.insert((agent.to_string(), file_id.to_string(), chunk.index));
        }
        drop(reported);
        reply_to(&self.publisher, agent, &reply);
    }

    /// Drops a file control message (init, status, finish, abort) the file service has no
    /// room for and tells its agent the server is busy: it asks again after its backoff.
    fn shed_control(&self, topic: &str) {
        self.counters.control_shed.fetch_add(1, Ordering::Relaxed);
        let Topic::Files { agent, rest } = Topic::parse(topic) else {
            return;
        };
        let Some((file_id, _)) = file_topics::parse_file_rest(rest) else {
            return;
        };
        let reply = fleetbus_protocol::FileReply::Failed {
            file_id: file_id.to_string(),
            kind: fleetbus_protocol::RefusalKind::Busy,
            reason: "the server's file service is busy: ask again later".into(),
        };
        reply_to(&self.publisher, agent, &reply);
    }
}

/// Publishes `reply` to `agent` on `fleet/{agent}/replies/files`. Not published, it costs
/// nothing: the agent asks again after its reply timeout.
pub(super) fn reply_to(publisher: &Publisher, agent: &str, reply: &fleetbus_protocol::FileReply) {
    match file_topics::encode(reply) {
        Ok(bytes) => {
            if let Err(e) = publisher.publish(file_topics::file_replies(agent), bytes) {
                tracing::debug!(%agent, error = %e, "file reply not published (the agent asks again)");
            }
        }
        Err(e) => tracing::error!(%agent, error = %e, "cannot encode a file reply"),
    }
}
