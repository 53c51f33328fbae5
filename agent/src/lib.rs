//! The fleetbus agent: a stable identity, a durable outbox, collectors that fill it, and
//! one outbound MQTT connection that empties it.
//!
//! ```text
//! collectors ──push──▶ Outbox (disk) ──read──▶ Publisher ──QoS 1──▶ broker
//!                          ▲                                         │
//!                          └──────────── ack on PUBACK ◀─────────────┘
//! ```
//!
//! Programs that embed the agent (the benchmarks, tests, custom collectors) open an
//! [`Agent`], push records through [`Agent::outbox`], and [`Agent::run`] it.

pub mod checks;
pub mod collectors;
pub mod config;
pub mod enroll;
mod http_client;
pub mod identity;
pub mod job_runner;
pub mod metadata;
pub mod outbox;
pub mod presence;
mod process;
pub mod publisher;
mod state_file;
pub mod uploads;

use std::path::PathBuf;
use std::sync::Arc;

pub use config::AgentConfig;
pub use fleetbus_config::Valid;
pub use outbox::{Outbox, OutboxItem, OutboxStats};
use tokio::sync::watch;
use tracing::Instrument;
pub use uploads::{AfterUpload, UploadJob, UploadOutcome, UploadProgress, UploadQueue};

/// Everything that can stop the agent, naming the file or value involved.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is inconsistent.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// A file in `state_dir` could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A path given to upload is not a file that can be uploaded (a directory, a device).
    #[error("cannot upload {}: {problem}", path.display())]
    NotUploadable {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        problem: String,
    },
    /// A file in `state_dir` holds something unusable.
    #[error("{}: {problem}", path.display())]
    State {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The outbox log failed (disk full, permissions, corruption).
    #[error("outbox: {0}")]
    Log(#[from] fleetbus_seglog::SegLogError),
    /// A record could not be built.
    #[error("record refused: {0}")]
    Record(String),
    /// Another agent process uses the same `state_dir`.
    #[error("{}: another agent process is running with this state_dir", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

/// An agent ready to run.
pub struct Agent {
    config: AgentConfig,
    id: String,
    outbox: Arc<Outbox>,
    uploads: Arc<UploadQueue>,
    jobs: job_runner::JobRunner,
    checks: checks::CheckRunner,
    cloud: metadata::CloudState,
    job_reports: tokio::sync::mpsc::Receiver<fleetbus_protocol::JobStatus>,
    token: Option<String>,
    bootstrap: Option<enroll::Bootstrap>,
    transport: fleetbus_mqtt::ClientTransport,
    // held for the agent's lifetime: one process per state_dir
    _lock: fleetbus_support::DirLock,
}

impl Agent {
    /// Creates `state_dir` (the configuration's values were checked when it was made
    /// [`Valid`]), resolves the agent id and opens
    /// the outbox (recovering whatever a crash left there).
    pub fn open(config: Valid<AgentConfig>) -> Result<Agent, AgentError> {
        let config = config.into_inner();
        fleetbus_support::create_dir(&config.state_dir).map_err(|source| AgentError::Io {
            path: config.state_dir.clone(),
            op: "create state directory",
            source,
        })?;
        let configured_token = config.connection.load_token().map_err(AgentError::Config)?;
        let bootstrap =
            enroll::Bootstrap::from_config(&config.connection).map_err(AgentError::Config)?;
        let transport = config
            .connection
            .transport(&config.server)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let lock = lock_state_dir(&config.state_dir)?;
        let id = identity::resolve(config.id.as_deref(), &config.state_dir)?;
        let token = match configured_token {
            Some(t) => Some(t),
            None => enroll::stored_token(&config.state_dir, &id)?,
        };
        let outbox = Outbox::open(&config.state_dir.join("outbox"), &id, &config.outbox)?;
        let uploads = UploadQueue::open(&config.state_dir, config.uploads.chunk_size)?;
        uploads.forget_older_than(config.uploads.remember);
        let (jobs, job_reports) =
            job_runner::JobRunner::open(&id, &config.groups, &config.jobs, &config.state_dir)?;
        let checks = checks::CheckRunner::open(
            &id,
            &config.checks,
            &config.check_runner,
            &config.state_dir,
        )?;
        Ok(Agent {
            config,
            id,
            outbox: Arc::new(outbox),
            uploads: Arc::new(uploads),
            jobs,
            checks,
            cloud: metadata::CloudState::default(),
            job_reports,
            token,
            bootstrap,
            transport,
            _lock: lock,
        })
    }

    /// The upload queue: submit files with [`UploadQueue::prepare`] and
    /// [`UploadQueue::submit`], follow them with [`UploadQueue::wait`].
    pub fn uploads(&self) -> &Arc<UploadQueue> {
        &self.uploads
    }

    /// The job runner (its counters and the recorded state of each job).
    pub fn jobs(&self) -> &job_runner::JobRunner {
        &self.jobs
    }

    /// The check runner (its counters).
    pub fn checks(&self) -> &checks::CheckRunner {
        &self.checks
    }

    /// The cloud identity, as last read from the metadata service.
    pub fn cloud(&self) -> &metadata::CloudState {
        &self.cloud
    }

    /// The configuration the agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The agent's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The outbox, for pushing records from the embedding program.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Runs the collectors and the connection until `shutdown` turns true, then forces
    /// the outbox to disk.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", agent = %self.id);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        tracing::info!(server = %self.config.server, groups = ?self.config.groups, "agent starting");
        let mut tasks = tokio::task::JoinSet::new();
        if self.config.metrics.enabled {
            tasks.spawn(collectors::run_system_metrics(
                self.outbox.clone(),
                self.config.metrics.interval,
                shutdown.clone(),
            ));
        }
        if self.config.heartbeat.enabled {
            tasks.spawn(collectors::run_heartbeat(
                self.outbox.clone(),
                self.config.heartbeat.interval,
                self.config.heartbeat.limit,
                shutdown.clone(),
            ));
        }
        if !self.config.checks.is_empty() {
            tasks.spawn(
                self.checks
                    .clone()
                    .run(self.outbox.clone(), shutdown.clone())
                    .in_current_span(),
            );
        }
        if self.config.metadata.provider != metadata::Provider::None {
            tasks.spawn(
                metadata::run_refresh(
                    self.config.metadata.clone(),
                    self.cloud.clone(),
                    shutdown.clone(),
                )
                .in_current_span(),
            );
            // the identity's tags go onto every record pushed from then on
            let (cloud, outbox, mut changed, mut stop) = (
                self.cloud.clone(),
                self.outbox.clone(),
                self.cloud.subscribe(),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        c = changed.changed() => if c.is_err() { return },
                        _ = stopped(&mut stop) => return,
                    }
                    if let Some(identity) = cloud.get() {
                        outbox.set_tags(identity.tags());
                    }
                }
            });
        }
        let birth_config = self.config.clone();
        let birth_id = self.id.clone();
        let birth_cloud = self.cloud.clone();
        let mut publisher = publisher::Publisher {
            agent: self.id.clone(),
            server: self.transport.clone(),
            connection: self.config.connection.clone(),
            token: self.token.clone(),
            outbox: self.outbox.clone(),
            birth: Arc::new(move || presence::birth(&birth_id, &birth_config, birth_cloud.get())),
            birth_changed: self.cloud.subscribe(),
            uploads: self.uploads.clone(),
            uploads_config: self.config.uploads.clone(),
            jobs: self.jobs.clone(),
            job_reports: tokio::sync::Mutex::new(self.job_reports),
        };
        if self.config.uploads.watch_dir.is_some() {
            tasks.spawn(
                uploads::watch::run_watcher(
                    self.uploads.clone(),
                    self.config.uploads.clone(),
                    shutdown.clone(),
                )
                .in_current_span(),
            );
        }
        // without a token of its own, a bootstrap login asks for one first
        let enrollment = match (&publisher.token, self.bootstrap) {
            (None, Some(bootstrap)) => Some((
                bootstrap,
                self.config.connection.clone(),
                self.config.state_dir.clone(),
            )),
            _ => None,
        };
        let mut publisher_shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                if let Some((bootstrap, connection, state_dir)) = enrollment {
                    publisher.token = enroll::obtain(
                        &publisher.server,
                        &publisher.agent,
                        &bootstrap,
                        &connection,
                        &state_dir,
                        &mut publisher_shutdown,
                    )
                    .await;
                    if publisher.token.is_none() {
                        return; // stopped while enrolling
                    }
                }
                publisher.run(publisher_shutdown).await
            }
            .in_current_span(),
        );
        tasks.spawn(
            self.outbox
                .clone()
                .run_syncer(shutdown.clone())
                .in_current_span(),
        );
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "agent task failed");
            }
        }
        self.outbox.sync()?;
        tracing::info!("agent stopped; outbox saved");
        Ok(())
    }
}

/// Takes the exclusive lock on `state_dir/agent.lock` (released when the process ends).
pub(crate) fn lock_state_dir(
    state_dir: &std::path::Path,
) -> Result<fleetbus_support::DirLock, AgentError> {
    match fleetbus_support::lock_dir(state_dir, "agent.lock") {
        Ok(lock) => Ok(lock),
        Err(fleetbus_support::LockError::Held { path }) => Err(AgentError::Locked { path }),
        Err(fleetbus_support::LockError::Io { path, source }) => Err(AgentError::Io {
            path,
            op: "lock",
            source,
        }),
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
