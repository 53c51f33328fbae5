//! `fleetbus serve`: one process with the embedded broker, the rules engine and its sinks,
//! and the services around them:
//!
//! - [`files`]: the file service (reassembly in the spool, replies, completion messages,
//!   delivery tracking, garbage collection);
//! - [`jobs`]: the job service and the agent registry, on their own thread;
//! - [`security`]: the broker's guard from `[broker.security]`, enrollment, broker events,
//!   credential reload;
//! - [`admin`] and [`metrics`]: the HTTP endpoints (over `http`, which bounds them);
//! - `config`: the `[...]` sections of the server's configuration file.
//!
//! Start-up order matters: the router starts, the rules engine attaches to it as an
//! in-process client subscribed to everything, and only then does the network listener
//! open, so no agent message can arrive before the engine sees it.

pub mod admin;
mod config;
mod demux;
pub mod files;
mod http;
pub mod jobs;
pub mod metrics;
pub mod security;
mod shutdown;
mod ticker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use config::{
    AdminSection, HttpSection, JobsSection, MetricsSection, RulesSection, ServerConfig, WalSection,
};
use demux::Route;
pub use files::{FileCounters, FilesSection};
use fleetbus_broker::{BrokerError, EmbeddedBroker, LinkRx, LinkTx, Notification};
use fleetbus_config::Valid;
use fleetbus_pipeline::{AckPublisher, Engine, EngineStats};
use fleetbus_protocol::{files as file_topics, topics, Topic};
use fleetbus_rules::{RuleSet, RulesError};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The lock file in `data_dir` held by the process that uses it (`serve` or `rules run`).
pub const DATA_DIR_LOCK: &str = "fleetbus.lock";

/// Client id of the in-process rules engine on the embedded broker.
pub const ENGINE_CLIENT_ID: &str = "fleetbus-rules-engine";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The job service's signing key is unusable.
    #[error("jobs.signing_key {}: {reason}", path.display())]
    SigningKey {
        /// The key file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// An HTTP endpoint cannot listen at its address.
    #[error("{key} {addr}: {source}")]
    Listen {
        /// The configuration key of the address (`metrics.listen`, `admin.listen`).
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The broker's access policy file is unusable.
    #[error("broker.security.policy: {0}")]
    Policy(#[from] fleetbus_broker::acl::PolicyError),
    /// The credential store cannot be opened or read.
    #[error("{0}")]
    Credentials(#[from] fleetbus_broker::credentials::CredentialError),
    /// The job ledger or agent registry cannot be opened.
    #[error("{0}")]
    Jobs(#[from] fleetbus_jobs::JobsError),
    /// The rules file is invalid.
    #[error("{0}")]
    Rules(#[from] RulesError),
    /// The broker could not start.
    #[error("{0}")]
    Broker(#[from] BrokerError),
    /// The file spool is unusable.
    #[error("file spool: {0}")]
    Spool(#[from] fleetbus_chunker::ChunkError),
    /// A thread could not be started.
    #[error("cannot start {what}: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process uses the data directory.
    #[error("data_dir: {0}")]
    Locked(#[from] fleetbus_support::LockError),
    /// The data directory is unusable.
    #[error("data_dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running server.
pub struct Server {
    broker: EmbeddedBroker,
    engine: Arc<Engine>,
    consumer: JoinHandle<()>,
    reporter: JoinHandle<()>,
    files: FileServiceHandle,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    admin: Option<(SocketAddr, JoinHandle<()>)>,
    jobs: Option<(
        Arc<jobs::JobsHandle>,
        std::thread::JoinHandle<()>,
        JoinHandle<()>,
    )>,
    security: security::SecurityTasks,
    addr: SocketAddr,
    // the stop signal of the inputs and the housekeeping tasks
    stopper: shutdown::Stopper,
    // the sending half of the engine's link (also used for acknowledgements)
    engine_link: Arc<Mutex<LinkTx>>,
    // held while the server runs (and through shutdown)
    _data_lock: fleetbus_support::DirLock,
}

impl Server {
    /// Starts broker, rules engine and sinks as configured. Relative paths in `config`
    /// must already be resolved (see [`ServerConfig::resolve_paths`]); its values were
    /// checked when it was made [`Valid`].
    pub async fn start(config: &Valid<ServerConfig>) -> Result<Server, ServerError> {
        let (stopper, stop) = shutdown::stop_signal();
        fleetbus_support::create_dir(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        // one server per data_dir: two would append to one log and garble the sinks' markers
        let data_lock = fleetbus_support::lock_dir(&config.data_dir, DATA_DIR_LOCK)?;
        let rules = match &config.rules.file {
            Some(path) => RuleSet::load(path)?,
            None => RuleSet::builtin()?,
        };
        tracing::info!(
            rules = rules.rules.len(),
            sinks = rules.own_sinks().count(),
            file = %config.rules.file.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "<built-in>".into()),
            "rules loaded"
        );
        let security = security::Security::open(
            &config.broker.security,
            &config.broker.limits,
            config.broker.max_connections,
            &config.data_dir,
        )?;
        let guard = security.guard.clone();
        let mut broker = EmbeddedBroker::start_guarded(config.broker.clone(), guard.clone())?;
        let (mut link_tx, link_rx) = broker.local_link(ENGINE_CLIENT_ID)?;
        // one catch-all subscription: the engine matches rule filters itself, and every
        // topic has a subscriber (rumqttd disconnects publishers to topics nobody wants)
        link_tx.subscribe("#").map_err(|e| BrokerError::Link {
            client_id: ENGINE_CLIENT_ID.into(),
            reason: e.to_string(),
        })?;
        let link_tx = Arc::new(Mutex::new(link_tx));
        let ack_link = link_tx.clone();
        let acks: AckPublisher = Arc::new(move |agent: &str, payload: Vec<u8>| {
            let mut link = ack_link.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = link.try_publish(topics::acks(agent), payload) {
                tracing::debug!(%agent, error = %e, "acknowledgement queued behind a busy router");
            }
        });
        let engine =
            Arc::new(Engine::start(rules, &config.data_dir, config.engine_options(), acks).await?);
        let reply_link = link_tx.clone();
        let replies: files::ReplyPublisher = Arc::new(move |agent: &str, payload: Vec<u8>| {
            let mut link = reply_link.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = link.try_publish(file_topics::file_replies(agent), payload) {
                tracing::debug!(%agent, error = %e, "file reply dropped behind a busy router (the agent asks again)");
            }
        });
        let file_counters = Arc::new(FileCounters::default());
        let shed_replies = replies.clone();
        let shed = files::ShedChunks::default();
        let service = files::FileService::open(
            &config.data_dir,
            config.files.clone(),
            engine.clone(),
            replies,
            file_counters.clone(),
            shed.clone(),
        )?;
        let (file_tx, file_thread, file_ticker) = files::spawn(service, FILES_TICK, stop.clone())
            .map_err(|source| ServerError::Thread {
            what: "the file service",
            source,
        })?;
        let jobs = {
            let job_link = link_tx.clone();
            let publish: fleetbus_jobs::Publish = Arc::new(move |topic, payload| {
                let mut link = job_link.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = link.try_publish(topic, payload) {
                    tracing::warn!(error = %e, "job message not published (sent again when its agent reconnects)");
                }
            });
            let event_engine = engine.clone();
            let announce: fleetbus_jobs::Announce = Arc::new(move |topic, payload| {
                event_engine.dispatch(&topic, &payload);
            });
            let (handle, thread, ticker) = jobs::start(
                &config.data_dir,
                &config.jobs,
                publish,
                announce,
                stop.clone(),
            )?;
            (Arc::new(handle), thread, ticker)
        };
        let enroller = match config.broker.security.enforce {
            true => {
                let enroll_link = link_tx.clone();
                let publish: security::Publish = Arc::new(move |topic, payload| {
                    let mut link = enroll_link.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = link.try_publish(topic, payload) {
                        tracing::warn!(error = %e, "enrollment reply not published (the agent asks again)");
                    }
                });
                let enroller = security::Enroller::open(&config.data_dir, guard.clone(), publish)?;
                // the thread ends when the consumer (the queue's only holder) is gone
                let (queue, _thread) = enroller.spawn()?;
                Some(queue)
            }
            false => None,
        };
        let job_handle = jobs.0.clone();
        let consumer = tokio::spawn(
            consume(
                link_rx,
                Destinations {
                    engine: engine.clone(),
                    files: file_tx,
                    file_counters: file_counters.clone(),
                    replies: shed_replies,
                    shed,
                    jobs: job_handle.clone(),
                    enroller,
                    guard: guard.clone(),
                },
            )
            .instrument(tracing::info_span!("rules_engine")),
        );
        let security = security.run(engine.clone(), broker.dropper())?;
        let reporter = tokio::spawn(report_stats(engine.clone(), STATS_INTERVAL, stop.clone()));
        let metrics = match config.metrics.listen {
            Some(at) => {
                let (bound, task) = metrics::start(
                    at,
                    config.http.clone(),
                    engine.clone(),
                    file_counters.clone(),
                    guard.clone(),
                    stop.clone(),
                )
                .await?;
                tracing::info!(addr = %bound, "metrics endpoint: GET /metrics");
                Some((bound, task))
            }
            None => None,
        };
        let admin = match config.admin.listen {
            // an address in use is an error: an operator's `fleetbus job` would otherwise
            // reach whichever server holds it
            Some(at) => {
                let (bound, task) = admin::start(
                    at,
                    &config.admin,
                    config.http.clone(),
                    &config.data_dir,
                    job_handle,
                    guard.clone(),
                    stop.clone(),
                )
                .await?;
                tracing::info!(addr = %bound, jobs = config.jobs.signing_key.is_some(), "admin endpoint: /jobs, /agents");
                Some((bound, task))
            }
            None => None,
        };
        let addr = broker.listen().await?;
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "fleetbus server ready");
        Ok(Server {
            broker,
            engine,
            consumer,
            reporter,
            files: FileServiceHandle {
                counters: file_counters,
                thread: Some(file_thread),
                ticker: file_ticker,
            },
            metrics,
            admin,
            jobs: Some(jobs),
            security,
            addr,
            stopper,
            engine_link: link_tx,
            _data_lock: data_lock,
        })
    }

    /// The MQTT listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics endpoint's address, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.0)
    }

    /// The admin endpoint's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.0)
    }

    /// The rules engine's counters.
    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    /// The file service's counters.
    pub fn file_stats(&self) -> &FileCounters {
        &self.files.counters
    }

    /// Graceful stop within `deadline`, in data-flow order (see [`shutdown`]):
    ///
    /// 1. inputs close: the broker refuses further traffic (agents keep what was not
    ///    acknowledged in their outboxes), the HTTP endpoints stop accepting and finish the
    ///    requests in flight, the housekeeping tickers stop;
    /// 2. the broker's router hands the engine's link everything it stored, ending with a
    ///    drained mark, and the consumer ends there;
    /// 3. the services it fed (file service, job service) empty their queues and end, and
    ///    the broker events still queued go into the engine;
    /// 4. the engine's last group commit (with its acknowledgements), the sinks write what
    ///    is durable, the de-duplication snapshot.
    ///
    /// Nothing is aborted: whatever is still running at the deadline is named in the log,
    /// and what it held is in the write-ahead log, the spool or an agent's outbox.
    pub async fn shutdown(mut self, deadline: Duration) {
        use shutdown::Running;
        let mut drain = shutdown::Drain::new(deadline);
        // 1. inputs
        self.broker.stop();
        self.stopper.stop();
        if let Some((_, task)) = self.metrics.take() {
            drain.wait("metrics endpoint", Running::Task(task)).await;
        }
        if let Some((_, task)) = self.admin.take() {
            drain.wait("admin endpoint", Running::Task(task)).await;
        }
        drain
            .wait("stats reporter", Running::Task(self.reporter))
            .await;
        // 2. what the router stored reaches the consumer, which ends at the drained mark
        let asked = self
            .engine_link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain();
        if let Err(e) = asked {
            // the link is gone, and with it the consumer
            tracing::warn!(error = %e, "broker link lost before the drain");
        }
        drain
            .wait("broker consumer", Running::Task(self.consumer))
            .await;
        // 3. the services: their queues close once the consumer and their tickers are gone
        drain
            .wait("file service ticker", Running::Task(self.files.ticker))
            .await;
        if let Some(thread) = self.files.thread.take() {
            drain.wait("file service", Running::Thread(thread)).await;
        }
        if let Some((handle, thread, ticker)) = self.jobs.take() {
            drain
                .wait("job service ticker", Running::Task(ticker))
                .await;
            drop(handle);
            drain.wait("job service", Running::Thread(thread)).await;
        }
        self.security.stop(&mut drain).await;
        // 4. the engine: last commit, sinks, snapshot
        for sink in self.engine.shutdown(drain.left()).await {
            drain.late(sink);
        }
        drain.finish();
    }
}

/// The file service's thread and the task that wakes it for housekeeping.
struct FileServiceHandle {
    counters: Arc<FileCounters>,
    thread: Option<std::thread::JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

/// How often the file service frees delivered files and collects idle uploads.
const FILES_TICK: Duration = Duration::from_secs(1);

/// Most shed chunks remembered as reported (beyond, a chunk may be reported lost twice and
/// sent once more than needed).
const MAX_SHED_REMEMBERED: usize = 65_536;

/// How often the engine's counters are logged.
const STATS_INTERVAL: Duration = Duration::from_secs(30);

/// Logs the engine's and every sink's counters every `interval` while anything changes:
/// per sink its lag in log entries, backlog bytes, retries and dead letters.
async fn report_stats(engine: Arc<Engine>, interval: Duration, mut stop: shutdown::StopSignal) {
    let mut last = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.stopped() => return,
        }
        let stats = engine.stats();
        let key = (
            stats.received,
            stats.durable,
            stats.sinks.iter().map(|(_, s)| s.position).sum::<u64>(),
        );
        if last == Some(key) {
            continue;
        }
        last = Some(key);
        tracing::info!(
            received = stats.received,
            duplicates = stats.duplicates,
            refused = stats.refused,
            undecodable = stats.decode_errors,
            invalid_names = stats.invalid_names,
            forged = stats.forged,
            unrouted = stats.unrouted,
            "engine"
        );
        for (name, s) in &stats.sinks {
            tracing::info!(
                sink = %name,
                lag = stats.durable.saturating_sub(s.position),
                backlog_bytes = s.pending_bytes,
                written = s.written,
                failed_attempts = s.failed_attempts,
                dead_lettered = s.dead_lettered,
                rejected = s.rejected,
                last_error = s.last_error.as_deref().unwrap_or(""),
                "sink"
            );
        }
    }
}

/// Hands an agent's job status report to the job service (nothing else reads it).
async fn forward_job_status(jobs: &jobs::JobsHandle, agent: &str, payload: &[u8]) {
    match fleetbus_protocol::message::decode_as::<fleetbus_protocol::JobStatus>(payload) {
        Ok(status) => {
            jobs.send(jobs::JobInput::Status(agent.to_string(), status))
                .await
        }
        Err(e) => tracing::warn!(%agent, error = %e, "unreadable job status ignored"),
    }
}

/// Drops a chunk the file service has no room for and tells its agent at once that it was
/// lost, so it is sent again.
fn shed_chunk(
    event: files::FileEvent,
    counters: &FileCounters,
    replies: &files::ReplyPublisher,
    shed: &files::ShedChunks,
) {
    counters.chunks_shed.fetch_add(1, Ordering::Relaxed);
    let files::FileEvent::Message { topic, payload } = event else {
        return;
    };
    let Topic::Files { agent, rest } = Topic::parse(&topic) else {
        return;
    };
    let Some((file_id, _)) = file_topics::parse_file_rest(rest) else {
        return;
    };
    // an undecodable chunk is dropped silently: the file service would only refuse it
    let Ok(chunk) = rmp_serde::from_slice::<fleetbus_protocol::FileChunk<'_>>(&payload) else {
        return;
    };
    let reply = fleetbus_protocol::FileReply::Chunk {
        file_id: file_id.to_string(),
        index: chunk.index,
        outcome: fleetbus_protocol::ChunkOutcome::Lost,
        reason: Some("the server is busy: chunk shed unread".into()),
    };
    if let Ok(bytes) = file_topics::encode(&reply) {
        let mut reported = shed.lock().unwrap_or_else(|p| p.into_inner());
        if reported.len() < MAX_SHED_REMEMBERED {
            reported.insert((agent.to_string(), file_id.to_string(), chunk.index));
        }
        drop(reported);
        replies(agent, bytes);
    }
}

/// Drops a file control message (init, status, finish, abort) the file service has no room
/// for and tells its agent the server is busy: it asks again after its backoff.
fn shed_control(event: files::FileEvent, counters: &FileCounters, replies: &files::ReplyPublisher) {
    counters.control_shed.fetch_add(1, Ordering::Relaxed);
    let files::FileEvent::Message { topic, .. } = event else {
        return;
    };
    let Topic::Files { agent, rest } = Topic::parse(&topic) else {
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
    if let Ok(bytes) = file_topics::encode(&reply) {
        replies(agent, bytes);
    }
}

/// With security enforced, an agent's groups are those of its credential, not those its
/// birth message claims (a rogue agent must not count as a member of another group).
fn enrolled_groups(
    guard: &fleetbus_broker::Guard,
    agent: &str,
    presence: &mut fleetbus_protocol::Presence,
) {
    if presence.status != fleetbus_protocol::PresenceStatus::Online {
        return;
    }
    let Some(groups) = guard.agent_groups(agent) else {
        return;
    };
    if presence.groups != groups {
        tracing::warn!(agent, claimed = ?presence.groups, enrolled = ?groups, "birth message claims other groups than the agent's credential: the credential's count");
        presence.groups = groups;
    }
}

/// A presence message on `agent`'s topic naming `claimed`: refused (not routed, not given
/// to the job service), logged and reported as a violation.
fn refuse_presence(guard: &fleetbus_broker::Guard, agent: &str, topic: &str, claimed: &str) {
    let reason = format!("presence message names agent `{claimed}`, not the topic's `{agent}`");
    tracing::warn!(agent, topic, %reason, "presence message refused");
    guard.report(fleetbus_protocol::BrokerEvent::Violation {
        client_id: agent.to_string(),
        peer: String::new(),
        action: "publish".into(),
        topic: topic.to_string(),
        reason,
        ts: chrono::Utc::now(),
    });
}

/// Where the messages the engine's link receives go besides the rules engine.
struct Destinations {
    engine: Arc<Engine>,
    files: tokio::sync::mpsc::Sender<files::FileEvent>,
    file_counters: Arc<FileCounters>,
    replies: files::ReplyPublisher,
    shed: files::ShedChunks,
    jobs: Arc<jobs::JobsHandle>,
    enroller: Option<security::EnrollQueue>,
    guard: Arc<fleetbus_broker::Guard>,
}

/// Feeds every message the router forwards to the in-process link into the engine, except
/// file transfer messages (to the file service), job status and presence (also to the job
/// service) and enrollment messages (to the enroller, never to the engine: replies carry
/// tokens). Ends at the router's drained mark (the server stops) or when the link is lost.
async fn consume(mut rx: LinkRx, to: Destinations) {
    let Destinations {
        engine,
        files,
        file_counters,
        replies,
        shed,
        jobs,
        enroller,
        guard,
    } = to;
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(forward))) => {
                let publish = forward.publish;
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    tracing::warn!("message with a non-UTF-8 topic skipped");
                    continue;
                };
                match demux::route(topic) {
                    // enrollment requests and replies (new tokens) never reach the rules
                    Route::Enrollment(agent) => {
                        if let (Some(enroller), Some(agent)) = (&enroller, agent) {
                            enroller.submit(agent, publish.payload.clone());
                        }
                    }
                    // a forged completion, job event or broker event: refused and counted
                    Route::Forged | Route::Engine => {
                        engine.dispatch_from_network(topic, &publish.payload);
                    }
                    Route::JobStatus(agent) => {
                        forward_job_status(&jobs, agent, &publish.payload).await
                    }
                    Route::OwnJobTraffic => {}
                    Route::Presence(agent) => {
                        match fleetbus_protocol::Presence::decode(&publish.payload) {
                            Ok(p) if p.agent != agent => {
                                // the topic's agent is the only identity: a birth message
                                // naming another agent would move it between groups
                                refuse_presence(&guard, agent, topic, &p.agent);
                                continue;
                            }
                            Ok(mut p) => {
                                enrolled_groups(&guard, agent, &mut p);
                                jobs.send(jobs::JobInput::Presence(p)).await
                            }
                            Err(e) => {
                                tracing::debug!(%topic, error = %e, "unreadable presence message")
                            }
                        }
                        engine.dispatch_from_network(topic, &publish.payload);
                    }
                    Route::File { chunk } => {
                        let event = files::FileEvent::Message {
                            topic: topic.to_string(),
                            payload: publish.payload,
                        };
                        // never wait for the file service: telemetry shares this consumer.
                        // A message it has no room for is shed and its agent told at once
                        // (a chunk: lost, sent again; anything else: busy, asked again)
                        match files.try_send(event) {
                            Err(tokio::sync::mpsc::error::TrySendError::Full(event)) => match chunk
                            {
                                true => shed_chunk(event, &file_counters, &replies, &shed),
                                false => shed_control(event, &file_counters, &replies),
                            },
                            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                                tracing::error!("file service stopped; file message dropped");
                            }
                            Ok(()) => {}
                        }
                    }
                }
            }
            Ok(Some(Notification::Drained)) => {
                // the server stops: everything the broker stored has been handed on
                return;
            }
            Ok(Some(Notification::Unschedule)) => {
                // the router paused us because our buffer was full: ask for more
                if let Err(e) = rx.wake().await {
                    tracing::error!(error = %e, "rules engine lost its broker link");
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "rules engine lost its broker link");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetbus_broker::acl::{Policy, Role};
    use fleetbus_broker::credentials::CredentialStore;
    use fleetbus_broker::{Gate, Guard, PolicyProtocol};
    use fleetbus_protocol::{Presence, PresenceStatus};
    use rumqttd::protocol::{Connect, Login, Packet, Protocol};

    use super::enrolled_groups;

    #[test]
    fn a_birth_message_cannot_claim_groups_its_credential_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        let token = store
            .enroll("web-01", Role::Agent, &["web".into()], false)
            .unwrap();
        let guard = Arc::new(Guard::new(
            true,
            Policy::default(),
            store.snapshot().unwrap(),
            None,
        ));
        let mut birth = Presence::offline("web-01", chrono::Utc::now());
        birth.status = PresenceStatus::Online;
        birth.groups = vec!["web".into(), "db".into()];
        // not connected: nothing to go by
        enrolled_groups(&guard, "web-01", &mut birth);
        assert_eq!(birth.groups, ["web", "db"]);
        let mut connection = PolicyProtocol::new(Arc::new(Gate::default()), guard.clone());
        let connect = Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: "web-01".into(),
                clean_session: true,
            },
            None,
            None,
            None,
            Some(Login {
                username: "web-01".into(),
                password: token,
            }),
        );
        connection.admit(&connect).unwrap();
        enrolled_groups(&guard, "web-01", &mut birth);
        assert_eq!(birth.groups, ["web"]);
    }
}
