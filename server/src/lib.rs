//! `fleetbus serve`: one process with the embedded broker, the rules engine and its sinks,
//! and the services around them:
//!
//! - [`file_service`]: the file service (reassembly in the spool, replies, completion messages,
//!   delivery tracking, garbage collection);
//! - [`job_service`]: the job service and the agent registry, on their own thread (the
//!   presence checks: a birth message speaks only for its agent, with its credential's groups);
//! - [`security`]: the broker's guard from `[broker.security]`, enrollment, broker events,
//!   credential reload;
//! - [`admin`] and [`metrics`]: the HTTP endpoints (over `http`, which bounds them);
//! - [`rules_reload`]: the rules file reloaded on SIGHUP, `POST /rules/reload` or a change
//!   (`[rules] watch`);
//! - `config`: the `[...]` sections of the server's configuration file.
//!
//! Start-up order matters: the router starts, the rules engine attaches to it as an
//! in-process client subscribed to everything, and only then does the network listener
//! open, so no agent message can arrive before the engine sees it.

pub mod admin;
mod config;
pub mod console_api;
mod demux;
pub mod file_service;
mod http;
pub mod job_service;
pub mod metrics;
pub mod rules_reload;
pub mod security;
mod shutdown;
mod ticker;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use config::{
    AdminSection, HttpSection, JobsSection, MetricsSection, RulesSection, ServerConfig, WalSection,
};
use demux::Route;
pub use file_service::{FileCounters, FilesSection};
use fleetbus_broker::{BrokerError, EmbeddedBroker, LinkRx, LinkTx, Notification};
use fleetbus_config::Valid;
use fleetbus_pipeline::{Engine, EngineStats};
use fleetbus_rules::{RuleSet, RulesError};
use job_service::PresenceVerdict;
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
    /// The event console's store is unusable (`[console]`: a password that cannot be
    /// read, a CA file that is not PEM).
    #[error("console: {0}")]
    Console(String),
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
    reloader: Arc<rules_reload::RulesReloader>,
    watcher: Option<JoinHandle<()>>,
    /// `[broker.security] policy`, read again by [`Server::reload`].
    policy_file: Option<std::path::PathBuf>,
    guard: Arc<fleetbus_broker::Guard>,
    files: FileServiceHandle,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    admin: Option<(SocketAddr, JoinHandle<()>)>,
    jobs: Option<(
        Arc<job_service::JobsHandle>,
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
        let publisher = broker_publisher(link_tx.clone());
        let engine = Arc::new(
            Engine::start(
                rules,
                &config.data_dir,
                config.engine_options(),
                publisher.clone(),
            )
            .await?,
        );
        let file_counters = Arc::new(FileCounters::default());
        let shed = file_service::ShedChunks::default();
        let service = file_service::FileService::open(
            &config.data_dir,
            config.files.clone(),
            engine.clone(),
            publisher.clone(),
            file_counters.clone(),
            shed.clone(),
        )?;
        let (file_tx, file_thread, file_ticker) =
            file_service::spawn(service, FILES_TICK, stop.clone()).map_err(|source| {
                ServerError::Thread {
                    what: "the file service",
                    source,
                }
            })?;
        let jobs = {
            let event_engine = engine.clone();
            let announce: fleetbus_jobs::Announce = Arc::new(move |topic, payload| {
                event_engine.dispatch(&topic, &payload);
            });
            let (handle, thread, ticker) = job_service::start(
                &config.data_dir,
                &config.jobs,
                publisher.clone(),
                announce,
                stop.clone(),
            )?;
            (Arc::new(handle), thread, ticker)
        };
        let enroller = match config.broker.security.enforce {
            true => {
                let enroller =
                    security::Enroller::open(&config.data_dir, guard.clone(), publisher.clone())?;
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
                    files: file_service::FileQueue {
                        tx: file_tx,
                        counters: file_counters.clone(),
                        publisher,
                        shed,
                    },
                    jobs: job_handle.clone(),
                    enroller,
                    guard: guard.clone(),
                },
            )
            .instrument(tracing::info_span!("rules_engine")),
        );
        let security = security.run(engine.clone(), broker.dropper())?;
        let reporter = tokio::spawn(report_stats(engine.clone(), STATS_INTERVAL, stop.clone()));
        let reloader = Arc::new(rules_reload::RulesReloader::new(
            config.rules.file.clone(),
            engine.clone(),
        ));
        let watcher = match config.rules.watch && config.rules.file.is_some() {
            true => Some(tokio::spawn(reloader.clone().watch(stop.clone()))),
            false => None,
        };
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
                    admin::Services {
                        jobs: job_handle,
                        rules: reloader.clone(),
                        stop: stop.clone(),
                        console: Arc::new(console_api::ConsoleApi::new(
                            config
                                .console
                                .store(
                                    &config.data_dir,
                                    fleetbus_console::DEFAULT_MAX_OPEN_PER_AGENT,
                                )
                                .map_err(ServerError::Console)?,
                            reloader.engine().clone(),
                        )),
                    },
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
            reloader,
            watcher,
            policy_file: config.broker.security.policy.clone(),
            guard,
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

    /// Reloads what SIGHUP reloads: the topic policy file (live connections whose grants
    /// it changes are dropped and come back under it), the TLS certificate, key and client
    /// CA (new handshakes use them; connections up keep theirs), and the rules file (read,
    /// checked and tested first). Each on its own: on an error the one in use stays, the
    /// error is logged and counted. Returns the rules' outcome (also kept for
    /// `GET /rules`).
    pub async fn reload(&self) -> Result<fleetbus_pipeline::ReloadReport, String> {
        self.reload_broker();
        let rules = self.reloader.reload().await;
        if let (Err(e), None) = (&rules, self.reloader.status().file) {
            tracing::info!(reason = %e, "rules not reloaded");
        }
        rules
    }

    /// The topic policy and the TLS certificate, read again.
    fn reload_broker(&self) {
        let failed = || {
            self.guard
                .counters()
                .reload_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        if let Some(path) = &self.policy_file {
            match fleetbus_broker::acl::Policy::load(path) {
                Ok(policy) => {
                    let changed = self.guard.set_policy(policy);
                    let dropper = self.broker.dropper();
                    for client_id in &changed {
                        if let Err(e) = dropper.drop_client(client_id, "the topic policy changed") {
                            tracing::error!(%client_id, error = %e, "cannot drop the connection");
                        }
                    }
                    tracing::info!(file = %path.display(), dropped = changed.len(), "topic policy reloaded: connections whose grants changed were dropped and reconnect under it");
                }
                Err(e) => {
                    failed();
                    tracing::error!(error = %e, "topic policy not reloaded: the one in effect stays");
                }
            }
        }
        match self.broker.reload_tls() {
            Ok(true) => tracing::info!("TLS certificate and key reloaded: new handshakes use them"),
            Ok(false) => {}
            Err(e) => {
                failed();
                tracing::error!(error = %e, "TLS certificate not reloaded: the one in use stays");
            }
        }
    }

    /// The generation of the rules in effect and the last refused reload.
    pub fn rules_status(&self) -> rules_reload::RulesStatus {
        self.reloader.status()
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
        if let Some(watcher) = self.watcher.take() {
            drain
                .wait("rules file watcher", Running::Task(watcher))
                .await;
        }
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

/// The one publish handle every service gets: a message published on the engine's
/// in-process link without waiting (a full router queue refuses it; the caller says what
/// that costs).
fn broker_publisher(link: Arc<Mutex<LinkTx>>) -> fleetbus_support::Publisher {
    fleetbus_support::Publisher::with_retain(move |topic, payload, retain| {
        let mut link = link.lock().unwrap_or_else(|p| p.into_inner());
        link.try_publish_with_retain(topic, payload, retain)
            .map(|_| ())
            .map_err(|e| fleetbus_support::NotPublished(e.to_string()))
    })
}

/// Where the messages the engine's link receives go besides the rules engine.
struct Destinations {
    engine: Arc<Engine>,
    files: file_service::FileQueue,
    jobs: Arc<job_service::JobsHandle>,
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
                    Route::JobStatus(agent) => jobs.status(agent, &publish.payload).await,
                    Route::OwnJobTraffic => {}
                    Route::Presence(agent) => {
                        match jobs.presence(&guard, agent, topic, &publish.payload).await {
                            PresenceVerdict::Refused => {}
                            PresenceVerdict::Routed { groups } => {
                                if let Some(groups) = groups {
                                    // before its records: they carry these groups
                                    engine.set_agent_groups(agent, &groups);
                                }
                                engine.dispatch_from_network(topic, &publish.payload);
                            }
                        }
                    }
                    Route::File { chunk } => files.offer(topic, publish.payload, chunk),
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
