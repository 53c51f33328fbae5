//! The job runner: verifies every job command against the server's public key, runs only
//! allow-listed operations with validated arguments, never runs a job id twice, and reports
//! every state change to the server.
//!
//! ```text
//! notify (own topic or a group's) ─▶ verify signature ─▶ known id? ─▶ report its record again
//!                                         │ bad: REJECTED       │ new
//!                                         ▼                     ▼
//!                                  (not remembered)   target / operation / arguments
//!                                                       │ bad: REJECTED (remembered)
//!                                                       ▼
//!                     wait for a slot (QUEUED) ─▶ record IN_PROGRESS (fsync) ─▶ run ─▶ record
//!                                                                              final state
//! ```
//!
//! Every execution has a record in `state_dir/jobs/{job_id}.json`, written before the
//! process starts and again when it ends. A job whose record exists is never started again:
//! its record is reported instead. One found IN_PROGRESS at start-up was interrupted by a
//! crash or a kill; it is reported FAILED, not run again (its side effects may have
//! happened). Rejections for a bad signature are not remembered: anyone can publish a
//! forged command, and remembering it would let them block the real job's id.

pub mod config;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use ed25519_dalek::VerifyingKey;
use fleetbus_protocol::jobs::{verifying_key_from_hex, CommandError};
use fleetbus_protocol::{
    ExecutionState, JobCommand, JobDocument, JobStatus, JobTarget, SignedCommand,
};
use regex::Regex;

use crate::process::{contain, exec};

/// How long a job's processes get between SIGTERM and SIGKILL (on timeout, and for those
/// it left running when it exited).
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

pub use config::{HandlerConfig, JobsConfig};

use crate::state_file::write_json;
use crate::AgentError;

/// Operations every agent knows without configuration.
pub const BUILTINS: [&str; 2] = ["echo", "shell"];

/// Status reports waiting for the connection, at most (beyond, reports are dropped: the
/// server sends pending jobs again on every connection and the agent then reports again).
const OUTGOING_CAPACITY: usize = 4096;

/// Counters of what the runner did (for tests, the demo and metrics).
#[derive(Debug, Default)]
pub struct JobCounters {
    /// Processes started (built-ins included).
    pub started: AtomicU64,
    /// Commands rejected (signature, target, operation, arguments).
    pub rejected: AtomicU64,
    /// Commands for a job already known, answered from its record.
    pub repeated: AtomicU64,
    /// Executions finished (any final state).
    pub finished: AtomicU64,
}

/// What is kept about one execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobRecord {
    operation: String,
    status: JobStatus,
}

/// The agent's job runner. Cheap to clone.
#[derive(Clone)]
pub struct JobRunner {
    inner: Arc<Inner>,
}

struct Inner {
    agent: String,
    groups: Vec<String>,
    config: JobsConfig,
    key: Option<VerifyingKey>,
    patterns: HashMap<String, BTreeMap<String, Regex>>,
    dir: PathBuf,
    slots: Arc<Semaphore>,
    outgoing: mpsc::Sender<JobStatus>,
    /// Jobs received and not finished (waiting for a slot or running).
    active: Mutex<HashSet<String>>,
    /// Jobs cancelled before they started.
    cancelled: Mutex<HashSet<String>>,
    counters: JobCounters,
}

impl JobRunner {
    /// Opens the runner's records under `state_dir/jobs`; executions a previous run left
    /// IN_PROGRESS are recorded FAILED. Returns the runner and the stream of status reports
    /// to publish.
    pub fn open(
        agent: &str,
        groups: &[String],
        config: &JobsConfig,
        state_dir: &Path,
    ) -> Result<(JobRunner, mpsc::Receiver<JobStatus>), AgentError> {
        let key = load_key(config)?;
        let mut patterns = HashMap::new();
        for (name, handler) in &config.handlers {
            let mut compiled = BTreeMap::new();
            for (arg, pattern) in &handler.args {
                let re = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    AgentError::Config(format!("jobs.handlers.{name}.args.{arg}: {e}"))
                })?;
                compiled.insert(arg.clone(), re);
            }
            patterns.insert(name.clone(), compiled);
        }
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
            path: dir.clone(),
            op: "create directory",
            source,
        })?;
        let (outgoing, rx) = mpsc::channel(OUTGOING_CAPACITY);
        let runner = JobRunner {
            inner: Arc::new(Inner {
                agent: agent.to_string(),
                groups: groups.to_vec(),
                config: config.clone(),
                key,
                patterns,
                dir,
                slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
                outgoing,
                active: Mutex::new(HashSet::new()),
                cancelled: Mutex::new(HashSet::new()),
                counters: JobCounters::default(),
            }),
        };
        runner.recover_interrupted()?;
        Ok((runner, rx))
    }

    /// What the runner did so far.
    pub fn counters(&self) -> &JobCounters {
        &self.inner.counters
    }

    /// The recorded state of a job on this agent, if it has one.
    pub fn status(&self, job_id: &str) -> Option<JobStatus> {
        self.read_record(job_id).map(|r| r.status)
    }

    /// The topics job commands arrive on: the agent's own and one per group.
    pub fn notify_topics(&self) -> Vec<String> {
        let mut topics = vec![fleetbus_protocol::jobs::agent_notify(&self.inner.agent)];
        topics.extend(
            self.inner
                .groups
                .iter()
                .map(|g| fleetbus_protocol::jobs::group_notify(g)),
        );
        topics
    }

    /// Handles one command message (from any notify topic).
    pub fn on_command(&self, payload: &[u8]) {
        let inner = &self.inner;
        let Some(key) = inner.key.as_ref() else {
            return self.reject_unverified(
                payload,
                "no jobs.public_key configured: every job is refused".into(),
            );
        };
        let command = match SignedCommand::verify(payload, key) {
            Ok(c) => c,
            Err(CommandError::BadSignature(reason)) => {
                return self.reject_unverified(payload, format!("bad signature: {reason}"))
            }
            Err(CommandError::Malformed(reason)) => {
                tracing::warn!(%reason, "unreadable job command ignored");
                inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        match command {
            JobCommand::Run { job, expires } => {
                let late = Utc::now() - expires;
                if late > chrono::Duration::seconds(fleetbus_protocol::jobs::CLOCK_SKEW_SECS) {
                    // replayed from the wire, or held back somewhere: not run, not
                    // remembered, not reported (a report would let a replay mark the
                    // real job refused). The server signs a fresh command on reconnect.
                    tracing::warn!(job_id = %job.id, expired = %expires, "expired job command ignored (replayed or delayed)");
                    inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.on_run(job)
            }
            JobCommand::Cancel { job_id, .. } => self.on_cancel(job_id),
        }
    }

    /// The server cancelled a job: one not started yet never will be, on this run or any
    /// later one (a CANCELED record is written, so a replayed run command after a restart
    /// is answered from it). A running one finishes.
    fn on_cancel(&self, job_id: String) {
        let inner = &self.inner;
        if fleetbus_protocol::validate_id("job id", &job_id).is_err() {
            return;
        }
        tracing::info!(%job_id, "job cancelled by the server");
        lock(&inner.cancelled).insert(job_id.clone());
        if self.read_record(&job_id).is_some() {
            return; // it ran, runs or was refused already
        }
        let status = terminal(
            &job_id,
            ExecutionState::Canceled,
            None,
            String::new(),
            Some("cancelled by the server before it started".into()),
        );
        let record = JobRecord {
            operation: String::new(),
            status: status.clone(),
        };
        if let Err(e) = write_json(&self.record_path(&job_id), &record) {
            tracing::error!(%job_id, error = %e, "cannot record the cancellation (kept in memory until a restart)");
        }
        if !lock(&inner.active).contains(&job_id) {
            self.report(status);
        }
    }

    fn on_run(&self, job: JobDocument) {
        let inner = &self.inner;
        if fleetbus_protocol::validate_id("job id", &job.id).is_err() {
            tracing::warn!(job_id = %job.id, "job with an unusable id ignored");
            inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(record) = self.read_record(&job.id) {
            inner.counters.repeated.fetch_add(1, Ordering::Relaxed);
            self.report(record.status);
            return;
        }
        if !lock(&inner.active).insert(job.id.clone()) {
            return; // already waiting or running; its report will come
        }
        let span = tracing::info_span!("job", job_id = %job.id, operation = %job.operation);
        let _entered = span.enter();
        let plan = match self.plan(&job) {
            Ok(p) => p,
            Err(reason) => {
                tracing::warn!(%reason, "job rejected");
                inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                let status = terminal(
                    &job.id,
                    ExecutionState::Rejected,
                    None,
                    String::new(),
                    Some(reason),
                );
                self.finish(&job, status);
                return;
            }
        };
        self.report(JobStatus {
            job_id: job.id.clone(),
            state: ExecutionState::Queued,
            started: None,
            finished: None,
            exit_code: None,
            output: String::new(),
            reason: None,
        });
        let runner = self.clone();
        tokio::spawn(async move { runner.execute(job, plan).await }.instrument(span.clone()));
    }

    /// What to run for `job`, or why not.
    fn plan(&self, job: &JobDocument) -> Result<Plan, String> {
        let inner = &self.inner;
        match &job.target {
            JobTarget::Agent(a) if a == &inner.agent => {}
            JobTarget::Group(g) if inner.groups.contains(g) => {}
            other => return Err(format!("this job is for {other}, not for this agent")),
        }
        let job_timeout = Duration::from_secs(job.timeout_secs.max(1));
        match job.operation.as_str() {
            "echo" => {
                let text: Vec<String> = job.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                Ok(Plan::Echo(text.join("\n")))
            }
            "shell" => {
                if !inner.config.allow_shell {
                    return Err("operation `shell` is disabled (jobs.allow_shell = false)".into());
                }
                let cmd = job
                    .args
                    .get("cmd")
                    .ok_or("operation `shell` needs the argument `cmd`")?;
                if let Some(extra) = job.args.keys().find(|k| *k != "cmd") {
                    return Err(format!("operation `shell` takes only `cmd`, not `{extra}`"));
                }
                Ok(Plan::Process {
                    argv: vec!["sh".into(), "-c".into(), cmd.clone()],
                    timeout: inner.config.default_timeout.min(job_timeout),
                })
            }
            op => {
                let Some(handler) = inner.config.handlers.get(op) else {
                    return Err(format!("unknown operation `{op}` (not in jobs.handlers)"));
                };
                let patterns = inner.patterns.get(op).ok_or("handler patterns missing")?;
                for (arg, value) in &job.args {
                    let Some(re) = patterns.get(arg) else {
                        return Err(format!("operation `{op}` takes no argument `{arg}`"));
                    };
                    if !re.is_match(value) {
                        return Err(format!(
                            "argument `{arg}` = {value:?} does not match {:?}",
                            handler
                                .args
                                .get(arg)
                                .map(String::as_str)
                                .unwrap_or_default()
                        ));
                    }
                }
                let mut argv = Vec::with_capacity(handler.command.len());
                for part in &handler.command {
                    let mut out = part.clone();
                    for name in config::placeholders(part) {
                        let value = job.args.get(name).ok_or_else(|| {
                            format!("operation `{op}` needs the argument `{name}`")
                        })?;
                        out = out.replace(&format!("{{{name}}}"), value);
                    }
                    argv.push(out);
                }
                Ok(Plan::Process {
                    argv,
                    timeout: handler.timeout.min(job_timeout),
                })
            }
        }
    }

    async fn execute(self, job: JobDocument, plan: Plan) {
        let inner = self.inner.clone();
        let Ok(_slot) = inner.slots.clone().acquire_owned().await else {
            return;
        };
        if lock(&inner.cancelled).remove(&job.id) {
            let status = terminal(
                &job.id,
                ExecutionState::Canceled,
                None,
                String::new(),
                Some("cancelled before it started".into()),
            );
            self.finish(&job, status);
            return;
        }
        let started = Utc::now();
        let running = JobStatus {
            job_id: job.id.clone(),
            state: ExecutionState::InProgress,
            started: Some(started),
            finished: None,
            exit_code: None,
            output: String::new(),
            reason: None,
        };
        if let Err(e) = self.write_record(&job, &running) {
            // without the record a restart could run it twice: do not start it
            tracing::error!(error = %e, "cannot record the job's start; not running it");
            let status = terminal(
                &job.id,
                ExecutionState::Failed,
                None,
                String::new(),
                Some(format!("cannot record the start: {e}")),
            );
            lock(&inner.active).remove(&job.id);
            self.report(status);
            return;
        }
        self.report(running);
        inner.counters.started.fetch_add(1, Ordering::Relaxed);
        tracing::info!("job started");
        let (state, exit_code, output, reason) = match plan {
            Plan::Echo(text) => (ExecutionState::Succeeded, Some(0), text, None),
            Plan::Process { argv, timeout } => {
                let marker = contain::marker(&job.id);
                let done = exec::run(&exec::Spec {
                    argv: &argv,
                    timeout,
                    grace: LEFTOVER_GRACE,
                    limit: inner.config.output_limit,
                    marker: &marker,
                })
                .await;
                let mut output = done.combined_output();
                if done.left_behind > 0 {
                    output.push_str(&format!(
                        "\n[{} process(es) the job left running were ended]",
                        done.left_behind
                    ));
                }
                match done.end {
                    exec::End::Exited(0) => (ExecutionState::Succeeded, Some(0), output, None),
                    exec::End::Exited(code) => (
                        ExecutionState::Failed,
                        Some(code),
                        output,
                        Some(format!("exited with code {code}")),
                    ),
                    exec::End::Signalled(signal) => (
                        ExecutionState::Failed,
                        None,
                        output,
                        Some(format!("killed by signal {signal}")),
                    ),
                    exec::End::TimedOut => (
                        ExecutionState::TimedOut,
                        None,
                        output,
                        Some(format!(
                            "ran longer than {timeout:?}; its processes were sent SIGTERM, then SIGKILL after {LEFTOVER_GRACE:?}"
                        )),
                    ),
                    exec::End::NotStarted(reason) => (ExecutionState::Failed, None, output, Some(reason)),
                }
            }
        };
        let mut status = terminal(&job.id, state, exit_code, output, reason);
        status.started = Some(started);
        tracing::info!(state = %status.state, exit_code = ?status.exit_code, "job finished");
        self.finish(&job, status);
    }

    /// Records a final state, forgets the job as active and reports it.
    fn finish(&self, job: &JobDocument, status: JobStatus) {
        if let Err(e) = self.write_record(job, &status) {
            tracing::error!(job_id = %job.id, error = %e, "cannot record the job's end (it will be reported FAILED after a restart)");
        }
        self.inner.counters.finished.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.active).remove(&job.id);
        self.report(status);
    }

    /// Reports a command that failed verification: REJECTED for the id it claims, if any,
    /// and not remembered.
    fn reject_unverified(&self, payload: &[u8], reason: String) {
        self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
        let claimed = SignedCommand::claimed_job_id(payload);
        tracing::warn!(job_id = ?claimed, %reason, "job command refused");
        if let Some(id) = claimed.filter(|id| fleetbus_protocol::validate_id("job id", id).is_ok())
        {
            if self.read_record(&id).is_none() {
                self.report(terminal(
                    &id,
                    ExecutionState::Rejected,
                    None,
                    String::new(),
                    Some(reason),
                ));
            }
        }
    }

    fn report(&self, status: JobStatus) {
        if self.inner.outgoing.try_send(status).is_err() {
            tracing::debug!(
                "job status report dropped (queue full); the server asks again on reconnect"
            );
        }
    }

    fn record_path(&self, job_id: &str) -> PathBuf {
        self.inner.dir.join(format!("{job_id}.json"))
    }

    fn read_record(&self, job_id: &str) -> Option<JobRecord> {
        let path = self.record_path(job_id);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "unreadable job record: the job counts as known and FAILED");
                Some(JobRecord {
                    operation: String::new(),
                    status: terminal(
                        job_id,
                        ExecutionState::Failed,
                        None,
                        String::new(),
                        Some(format!("unreadable record: {e}")),
                    ),
                })
            }
        }
    }

    fn write_record(&self, job: &JobDocument, status: &JobStatus) -> Result<(), AgentError> {
        let record = JobRecord {
            operation: job.operation.clone(),
            status: status.clone(),
        };
        write_json(&self.record_path(&job.id), &record)
    }

    /// Marks executions a previous run left IN_PROGRESS as FAILED (and reports them).
    fn recover_interrupted(&self) -> Result<(), AgentError> {
        let dir = &self.inner.dir;
        let entries = std::fs::read_dir(dir).map_err(|source| AgentError::Io {
            path: dir.clone(),
            op: "list",
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let Some(mut record) = self.read_record(&id) else {
                continue;
            };
            if record.status.state == ExecutionState::InProgress {
                tracing::warn!(job_id = %id, "job interrupted by an agent stop: recorded FAILED, not run again");
                record.status.state = ExecutionState::Failed;
                record.status.finished = Some(Utc::now());
                record.status.reason =
                    Some("interrupted: the agent stopped while it ran (not run again)".into());
                write_json(&path, &record)?;
                self.report(record.status);
            }
        }
        Ok(())
    }
}

/// What a job will do.
enum Plan {
    /// The built-in `echo`: its arguments as output.
    Echo(String),
    /// A process.
    Process {
        argv: Vec<String>,
        timeout: Duration,
    },
}

fn terminal(
    job_id: &str,
    state: ExecutionState,
    exit_code: Option<i32>,
    output: String,
    reason: Option<String>,
) -> JobStatus {
    JobStatus {
        job_id: job_id.to_string(),
        state,
        started: None,
        finished: Some(Utc::now()),
        exit_code,
        output,
        reason,
    }
}

fn load_key(config: &JobsConfig) -> Result<Option<VerifyingKey>, AgentError> {
    let text = match (&config.public_key, &config.public_key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| AgentError::Io {
            path: path.clone(),
            op: "read jobs.public_key_file",
            source,
        })?,
        (None, None) => return Ok(None),
    };
    verifying_key_from_hex(&text)
        .map(Some)
        .map_err(|e| AgentError::Config(format!("jobs public key: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
