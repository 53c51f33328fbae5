//! The server-side job service: a ledger of jobs and per-target executions, signed dispatch
//! to one agent or to a whole group with one publish, rollout rate, abort threshold, job
//! timeouts, cancel, and every state change handed on as a message rules can route.
//!
//! It does no I/O of its own beyond its ledger: the server gives it a
//! [`Publisher`](fleetbus_support::Publisher) (to the broker) and an [`Announce`] function (into the rules engine) and feeds it agents'
//! presence and status messages.
//!
//! Delivery never depends on the broker's memory: an execution stays QUEUED in the ledger
//! until its agent reports; every time an agent announces itself (birth message) its pending
//! jobs are sent again on its own topic. Agents answer a job they already ran from their
//! records, so sending again is always safe.

pub mod ledger;
pub mod registry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ed25519_dalek::SigningKey;
use fleetbus_protocol::jobs::{agent_notify, group_notify};
use fleetbus_protocol::{
    ExecutionState, JobCommand, JobDocument, JobEvent, JobStatus, JobTarget, Presence,
    PresenceStatus,
};
pub use ledger::{Execution, JobState, Ledger, Rollout, StoredJob};
pub use registry::{Birth, HourCount, KnownAgent, Registry};
use serde::{Deserialize, Serialize};

/// Errors of the job service.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The ledger (SQLite) failed.
    #[error("job ledger: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The ledger file cannot be opened.
    #[error("job ledger {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// A stored document cannot be read or written.
    #[error("job ledger: bad document: {0}")]
    Json(#[from] serde_json::Error),
    /// The request is unusable (unknown job, empty target, bad id).
    #[error("{0}")]
    Request(String),
    /// No such job.
    #[error("no job `{0}`")]
    NotFound(String),
    /// No such agent in the registry.
    #[error("no agent `{0}` is known to this server (fleetbus agents list)")]
    NoAgent(String),
    /// Jobs were asked for and the server has no signing key.
    #[error("the job service is off: set jobs.signing_key in the server configuration (fleetbus keys generate)")]
    Off,
}

impl JobsError {
    fn ledger(path: &Path, source: rusqlite::Error) -> JobsError {
        JobsError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Hands a job state change to the rules engine (topic, JSON payload).
pub type Announce = Arc<dyn Fn(String, Vec<u8>) + Send + Sync>;

/// What forgetting an agent did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forgotten {
    /// The agent.
    pub agent: String,
    /// Active jobs it was removed from (it had not started them).
    pub removed_from: Vec<String>,
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRequest {
    /// One agent or a group.
    pub target: JobTarget,
    /// The operation (an agent handler name).
    pub operation: String,
    /// Its arguments.
    #[serde(default)]
    pub args: std::collections::BTreeMap<String, String>,
    /// Most seconds one execution may run.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Rollout and abort settings.
    #[serde(default)]
    pub rollout: Rollout,
    /// Queue the job even when no known agent is a target (an agent id never seen, a group
    /// with no known member): it waits for targets that connect later, until
    /// the offline expiry. Without it such a push is refused.
    #[serde(default)]
    pub allow_empty: bool,
}

fn default_timeout() -> u64 {
    300
}

/// A job with its executions and a count per state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    /// The job.
    pub job: StoredJob,
    /// Executions per state.
    pub counts: std::collections::BTreeMap<ExecutionState, usize>,
    /// Every execution (empty in lists).
    #[serde(default)]
    pub executions: Vec<Execution>,
}

impl JobReport {
    /// Executions in any state.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Executions in a final state.
    pub fn finished(&self) -> usize {
        self.counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum()
    }

    /// Executions that ended badly (failed, timed out, rejected).
    pub fn failed(&self) -> usize {
        self.counts
            .iter()
            .filter(|(s, _)| is_failure(**s))
            .map(|(_, n)| n)
            .sum()
    }
}

fn is_failure(s: ExecutionState) -> bool {
    matches!(
        s,
        ExecutionState::Failed | ExecutionState::TimedOut | ExecutionState::Rejected
    )
}

/// Grace beyond a job's timeout before the server marks executions still running
/// TIMED_OUT (the agent kills at the timeout and reports; this covers agents that vanish).
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// Which agents `agents list` shows: each given part must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentFilter {
    /// Members of this group.
    pub group: Option<String>,
    /// `KEY=VALUE`: an operator tag of the birth message.
    pub tag: Option<String>,
    /// `KEY=VALUE`: a field of the cloud identity (`provider`, `region`, `zone`, `role`,
    /// `instance_type`, `image_id`, `instance_id`).
    pub meta: Option<String>,
    /// `online` or `offline`.
    pub state: Option<String>,
}

impl AgentFilter {
    /// Whether `a` passes.
    pub fn keeps(&self, a: &KnownAgent) -> bool {
        fn pair(s: &Option<String>) -> Option<(&str, &str)> {
            s.as_deref()
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        }
        if self.group.as_deref().is_some_and(|g| !a.in_group(g)) {
            return false;
        }
        if let Some((k, v)) = pair(&self.tag) {
            if a.birth
                .as_ref()
                .and_then(|b| b.tags.get(k))
                .map(String::as_str)
                != Some(v)
            {
                return false;
            }
        }
        if let Some((k, v)) = pair(&self.meta) {
            let cloud = a.birth.as_ref().and_then(|b| b.cloud.as_ref());
            let value = cloud.and_then(|c| match k {
                "provider" | "cloud" => Some(c.provider.clone()),
                "instance_id" => Some(c.instance_id.clone()),
                _ => c.tags().get(k).cloned(),
            });
            if value.as_deref() != Some(v) {
                return false;
            }
        }
        match self.state.as_deref() {
            Some("online") => a.online,
            Some("offline") => !a.online,
            _ => true,
        }
    }
}

/// One agent and its latest job executions (`fleetbus agents show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDetail {
    /// The registry's record.
    pub agent: KnownAgent,
    /// Its latest executions, the latest first (at most 10).
    pub jobs: Vec<RecentJob>,
}

/// A job execution of one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentJob {
    /// The job.
    pub job_id: String,
    /// Its operation.
    pub operation: String,
    /// The agent's execution of it.
    pub execution: Execution,
}

/// The job service, and the registry of agents it targets.
pub struct JobService {
    ledger: Ledger,
    registry: Registry,
    /// None: the service only keeps the registry; job requests answer [`JobsError::Off`].
    key: Option<SigningKey>,
    publish: fleetbus_support::Publisher,
    announce: Announce,
    /// Inside [`JobService::batch`]: jobs with an execution newly finished, checked for
    /// abort and completion once at the end of the batch instead of after every report.
    finished_in_batch: Option<std::collections::BTreeSet<String>>,
    /// How long a signed command stays valid (each send is signed afresh).
    command_ttl: chrono::Duration,
    /// How long an execution may stay QUEUED after it was last sent before it ends
    /// TIMED_OUT (its agent is offline or gone).
    offline_expiry: chrono::Duration,
}

/// How long an execution may stay QUEUED by default (see [`JobService::with_offline_expiry`]).
pub const DEFAULT_OFFLINE_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// Most expired executions ended per tick (the rest at the next ones).
const EXPIRE_BATCH: usize = 10_000;

/// How long a signed run command is valid by default (see [`JobService::with_command_ttl`]).
pub const DEFAULT_COMMAND_TTL: std::time::Duration = std::time::Duration::from_secs(600);

impl JobService {
    /// Opens the ledger at `data_dir/jobs.sqlite` and the registry at
    /// `data_dir/agents.sqlite`. Without a signing `key` only the registry works.
    pub fn open(
        data_dir: &Path,
        key: Option<SigningKey>,
        publish: fleetbus_support::Publisher,
        announce: Announce,
    ) -> Result<JobService, JobsError> {
        let mut ledger = Ledger::open(&data_dir.join("jobs.sqlite"))?;
        let mut registry = Registry::open(&data_dir.join("agents.sqlite"))?;
        // an older version kept the registry inside the ledger: hand it over once
        let legacy = ledger.take_legacy_agents()?;
        if !legacy.is_empty() && registry.is_empty()? {
            registry.import(&legacy)?;
        }
        ledger.drop_legacy_agents()?;
        Ok(JobService {
            ledger,
            registry,
            key,
            publish,
            announce,
            finished_in_batch: None,
            command_ttl: chrono::Duration::seconds(DEFAULT_COMMAND_TTL.as_secs() as i64),
            offline_expiry: chrono::Duration::seconds(DEFAULT_OFFLINE_EXPIRY.as_secs() as i64),
        })
    }

    /// Publishes a job or a cancel without waiting. Not published, it is not lost: the
    /// execution stays QUEUED in the ledger and is sent again when its agent reconnects.
    fn send(&self, topic: String, payload: Vec<u8>) {
        if let Err(e) = self.publish.publish(topic, payload) {
            tracing::warn!(error = %e, "job message not published (sent again when its agent reconnects)");
        }
    }

    /// The same service ending executions still QUEUED `expiry` after they were last sent.
    pub fn with_offline_expiry(mut self, expiry: Duration) -> JobService {
        self.offline_expiry = chrono::Duration::from_std(expiry).unwrap_or(chrono::Duration::MAX);
        self
    }

    fn key(&self) -> Result<&SigningKey, JobsError> {
        self.key.as_ref().ok_or(JobsError::Off)
    }

    /// The same service signing run commands valid for `ttl` after each send.
    pub fn with_command_ttl(mut self, ttl: std::time::Duration) -> JobService {
        self.command_ttl = chrono::Duration::from_std(ttl)
            .unwrap_or_else(|_| chrono::Duration::seconds(DEFAULT_COMMAND_TTL.as_secs() as i64));
        self
    }

    /// The run command of `doc`, signed now and valid for the command ttl: every send
    /// (the first, a re-send at reconnect, a rollout step) is signed afresh, so a command
    /// captured on the wire expires.
    fn run_command(&self, doc: &JobDocument) -> Result<Vec<u8>, JobsError> {
        let command = JobCommand::Run {
            job: doc.clone(),
            expires: Utc::now() + self.command_ttl,
        };
        Ok(command.sign(self.key()?)?.encode()?)
    }

    /// Runs `work` (presence and status messages) as one ledger transaction: one fsync for
    /// the whole batch instead of one per message, and each job touched is checked for
    /// abort and completion once, at the end. Operators' requests are not meant to run
    /// inside (a pushed job must be on disk before it is published).
    pub fn batch<T>(&mut self, work: impl FnOnce(&mut JobService) -> T) -> Result<T, JobsError> {
        self.ledger.begin()?;
        if let Err(e) = self.registry.begin() {
            let _ = self.ledger.commit();
            return Err(e);
        }
        self.finished_in_batch = Some(Default::default());
        let out = work(self);
        let mut settled = Ok(());
        for job_id in self.finished_in_batch.take().unwrap_or_default() {
            let step = match self.ledger.job(&job_id) {
                Ok(Some(job)) => self.after_finish(&job),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                settled = Err(e);
                break;
            }
        }
        let committed = self.ledger.commit();
        let registered = self.registry.commit();
        settled?;
        committed?;
        registered?;
        Ok(out)
    }

    /// Creates, signs, records and dispatches a job; answers its summary (counts per
    /// state). A group job's targets are the members known from birth messages; members
    /// that announce themselves later while it is active are added. A push with no known
    /// target (an agent never seen, a group with no known member) is refused unless the
    /// request allows it.
    pub fn push(&mut self, req: PushRequest) -> Result<JobReport, JobsError> {
        self.key()?;
        if req.operation.is_empty() {
            return Err(JobsError::Request("operation is empty".into()));
        }
        let target_name = match &req.target {
            JobTarget::Agent(a) | JobTarget::Group(a) => a,
        };
        fleetbus_protocol::validate_id("target", target_name)
            .map_err(|e| JobsError::Request(e.to_string()))?;
        if let Some(pct) = req.rollout.abort_failure_pct {
            if !(0.0..=100.0).contains(&pct) {
                return Err(JobsError::Request(
                    "abort_failure_pct must be between 0 and 100".into(),
                ));
            }
        }
        if req.rollout.max_per_minute == Some(0) {
            return Err(JobsError::Request(
                "max_per_minute must be above 0 (leave it unset for all at once)".into(),
            ));
        }
        let doc = JobDocument {
            id: uuid::Uuid::new_v4().simple().to_string(),
            operation: req.operation,
            args: req.args,
            timeout_secs: req.timeout_secs.max(1),
            created: Utc::now(),
            target: req.target,
        };
        let signed = self.run_command(&doc)?;
        if signed.len() > fleetbus_protocol::jobs::MAX_COMMAND_BYTES {
            return Err(JobsError::Request(format!(
                "the signed job is {} bytes, more than the {} a command may have (agents could not receive it): pass less in its arguments",
                signed.len(),
                fleetbus_protocol::jobs::MAX_COMMAND_BYTES
            )));
        }
        let targets = match &doc.target {
            JobTarget::Agent(a) => {
                if !req.allow_empty && self.registry.get(a)?.is_none() {
                    return Err(JobsError::Request(format!(
                        "no agent `{a}` is known to this server (agents announce themselves when they connect: fleetbus agents list); allow_empty (--allow-empty) queues the job until it connects"
                    )));
                }
                vec![a.clone()]
            }
            JobTarget::Group(g) => {
                let members = self.registry.members(g)?;
                if members.is_empty() && !req.allow_empty {
                    return Err(JobsError::Request(format!(
                        "group `{g}` has no known member (agents announce their groups when they connect: fleetbus agents list); allow_empty (--allow-empty) queues the job for members that connect later"
                    )));
                }
                members
            }
        };
        let job = StoredJob {
            doc,
            rollout: req.rollout,
            state: JobState::Active,
            signed,
        };
        self.ledger.insert_job(&job, &targets)?;
        tracing::info!(job_id = %job.doc.id, target = %job.doc.target, operation = %job.doc.operation, targets = targets.len(), "job pushed");
        for agent in &targets {
            self.announce_state(&job, &self.queued(agent));
        }
        if job.rollout.max_per_minute.is_none() {
            let now = Utc::now();
            match &job.doc.target {
                JobTarget::Group(g) => self.send(group_notify(g), job.signed.clone()),
                JobTarget::Agent(a) => self.send(agent_notify(a), job.signed.clone()),
            }
            self.ledger.mark_sent(&job.doc.id, &targets, now)?;
        } else {
            self.roll_out(&job.doc.id)?;
        }
        self.summary(&job.doc.id)
    }

    fn queued(&self, agent: &str) -> Execution {
        Execution {
            agent: agent.to_string(),
            state: ExecutionState::Queued,
            sent: None,
            started: None,
            finished: None,
            exit_code: None,
            output: String::new(),
            reason: None,
        }
    }

    /// A job with every execution.
    pub fn report(&self, job_id: &str) -> Result<JobReport, JobsError> {
        let mut report = self.summary(job_id)?;
        report.executions = self.ledger.executions(job_id)?;
        Ok(report)
    }

    /// A job with its counts per state only (no executions).
    pub fn summary(&self, job_id: &str) -> Result<JobReport, JobsError> {
        let job = self
            .ledger
            .job(job_id)?
            .ok_or_else(|| JobsError::NotFound(job_id.to_string()))?;
        Ok(JobReport {
            job,
            counts: self.ledger.counts(job_id)?,
            executions: Vec::new(),
        })
    }

    /// The newest jobs, with counts only.
    pub fn list(&self, limit: usize) -> Result<Vec<JobReport>, JobsError> {
        self.ledger
            .job_ids(limit, false)?
            .iter()
            .map(|id| self.summary(id))
            .collect()
    }

    /// Agents known from presence messages that `filter` keeps.
    pub fn agents(&self, filter: &AgentFilter) -> Result<Vec<KnownAgent>, JobsError> {
        let mut agents = self.registry.all()?;
        agents.retain(|a| filter.keeps(a));
        Ok(agents)
    }

    /// One agent as the registry knows it, with its latest job executions.
    pub fn agent(&self, id: &str) -> Result<AgentDetail, JobsError> {
        let agent = self
            .registry
            .get(id)?
            .ok_or_else(|| JobsError::NoAgent(id.to_string()))?;
        let jobs = self
            .ledger
            .recent_for(id, 10)?
            .into_iter()
            .map(|(job_id, operation, execution)| RecentJob {
                job_id,
                operation,
                execution,
            })
            .collect();
        Ok(AgentDetail { agent, jobs })
    }

    /// Agents online per hour since `since` (of `group`, of `role`).
    pub fn hours(
        &self,
        since: chrono::DateTime<Utc>,
        group: Option<&str>,
        role: Option<&str>,
    ) -> Result<Vec<HourCount>, JobsError> {
        self.registry.hours(since, group, role)
    }

    /// Forgets an agent: out of the registry (so out of `agents list` and of the targets of
    /// group jobs pushed from now on), and out of the targets of active jobs it has not
    /// started (those jobs can then end). Executions it started keep running to their end
    /// or timeout. An agent that connects again is known again.
    pub fn forget(&mut self, agent: &str) -> Result<Forgotten, JobsError> {
        let known = self.registry.forget(agent)?;
        let jobs = self.ledger.remove_queued(agent)?;
        if !known && jobs.is_empty() {
            return Err(JobsError::NoAgent(agent.to_string()));
        }
        for job_id in &jobs {
            if let Some(job) = self.ledger.job(job_id)? {
                self.after_finish(&job)?;
            }
        }
        tracing::info!(%agent, removed_from = jobs.len(), "agent forgotten");
        Ok(Forgotten {
            agent: agent.to_string(),
            removed_from: jobs,
        })
    }

    /// Cancels a job: executions not started become CANCELED and agents are told not to
    /// start it (running ones finish).
    pub fn cancel(&mut self, job_id: &str) -> Result<JobReport, JobsError> {
        self.stop(job_id, JobState::Canceled, "cancelled by an operator")?;
        self.summary(job_id)
    }

    fn stop(&mut self, job_id: &str, state: JobState, why: &str) -> Result<(), JobsError> {
        let job = self
            .ledger
            .job(job_id)?
            .ok_or_else(|| JobsError::NotFound(job_id.to_string()))?;
        if job.state != JobState::Active {
            return Ok(());
        }
        let cancel = JobCommand::Cancel {
            job_id: job_id.to_string(),
            ts: Utc::now(),
        }
        .sign(self.key()?)?
        .encode()?;
        self.ledger.set_job_state(job_id, state)?;
        let now = Utc::now();
        let canceled: Vec<Execution> = self
            .ledger
            .executions(job_id)?
            .into_iter()
            .filter(|e| e.state == ExecutionState::Queued)
            .map(|mut e| {
                e.state = ExecutionState::Canceled;
                e.finished = Some(now);
                e.reason = Some(why.to_string());
                e
            })
            .collect();
        self.ledger.update_executions(job_id, &canceled)?;
        let mut told = Vec::new();
        for e in canceled {
            self.announce_state(&job, &e);
            told.push(e.agent);
        }
        match &job.doc.target {
            JobTarget::Group(g) => self.send(group_notify(g), cancel),
            JobTarget::Agent(_) => {
                for a in &told {
                    self.send(agent_notify(a), cancel.clone());
                }
            }
        }
        tracing::info!(%job_id, canceled = told.len(), %why, "job stopped");
        Ok(())
    }

    /// An agent's presence message: remembers its groups; when it comes online, adds it to
    /// active group jobs it belongs to and sends it every job still pending for it.
    pub fn on_presence(&mut self, presence: &Presence) -> Result<(), JobsError> {
        let online = presence.status == PresenceStatus::Online;
        self.registry.upsert(
            &presence.agent,
            &presence.groups,
            online,
            Utc::now(),
            online.then(|| registry::Birth::of(presence)).as_ref(),
        )?;
        if !online || self.key.is_none() {
            return Ok(());
        }
        for job_id in self.ledger.job_ids(1000, true)? {
            let Some(job) = self.ledger.job(&job_id)? else {
                continue;
            };
            if let JobTarget::Group(g) = &job.doc.target {
                if presence.groups.contains(g)
                    && self.ledger.add_target(&job_id, &presence.agent)?
                {
                    self.announce_state(&job, &self.queued(&presence.agent));
                }
            }
        }
        for job_id in self.ledger.pending_for(&presence.agent)? {
            let Some(job) = self.ledger.job(&job_id)? else {
                continue;
            };
            let held_by_rollout = job.rollout.max_per_minute.is_some()
                && self
                    .ledger
                    .execution(&job_id, &presence.agent)?
                    .is_some_and(|e| e.sent.is_none());
            if held_by_rollout {
                continue;
            }
            self.send(agent_notify(&presence.agent), self.run_command(&job.doc)?);
            self.ledger
                .mark_sent(&job_id, std::slice::from_ref(&presence.agent), Utc::now())?;
        }
        Ok(())
    }

    /// An agent's status report.
    pub fn on_status(&mut self, agent: &str, status: JobStatus) -> Result<(), JobsError> {
        let Some(job) = self.ledger.job(&status.job_id)? else {
            tracing::debug!(%agent, job_id = %status.job_id, state = %status.state, "status for an unknown job ignored");
            return Ok(());
        };
        let mut e = match self.ledger.execution(&status.job_id, agent)? {
            Some(e) => e,
            None if matches!(
                status.state,
                ExecutionState::Queued | ExecutionState::Rejected | ExecutionState::Canceled
            ) =>
            {
                // nothing ran: a refusal from outside the targets changes no count
                tracing::debug!(%agent, job_id = %status.job_id, state = %status.state, "report from an agent the job was not sent to ignored");
                return Ok(());
            }
            None => {
                // it ran where the ledger did not expect it: a command
                // that reached an agent outside the job's targets (a replay, a member
                // that joined as the job ended). The ledger records every execution it
                // hears of, so none happens unknown to it.
                tracing::warn!(%agent, job_id = %status.job_id, state = %status.state, "an agent the job was not sent to reports an execution: recorded");
                self.ledger.add_target(&status.job_id, agent)?;
                let mut e = self.queued(agent);
                e.reason =
                    Some("not a target of this job when it ran: recorded from its report".into());
                e
            }
        };
        if e.state.is_terminal() || e.state == status.state {
            return Ok(()); // final states are final; repeats change nothing
        }
        if status.state == ExecutionState::Queued {
            return Ok(()); // the agent got it; it stays QUEUED here until it starts
        }
        e.state = status.state;
        e.started = status.started.or(e.started);
        e.finished = status.finished;
        e.exit_code = status.exit_code;
        e.output = status.output;
        e.reason = status.reason.or(e.reason);
        self.ledger.update_execution(&status.job_id, &e)?;
        self.announce_state(&job, &e);
        if e.state.is_terminal() {
            match self.finished_in_batch.as_mut() {
                Some(jobs) => {
                    jobs.insert(job.doc.id);
                }
                None => self.after_finish(&job)?,
            }
        }
        Ok(())
    }

    /// Checks the abort threshold and whether the job is done.
    fn after_finish(&mut self, job: &StoredJob) -> Result<(), JobsError> {
        let report = self.summary(&job.doc.id)?;
        if report.job.state != JobState::Active {
            return Ok(());
        }
        let finished = report.finished();
        if let Some(pct) = job.rollout.abort_failure_pct {
            let failed = report.failed();
            if finished > 0
                && finished as u32 >= job.rollout.abort_min_finished
                && (failed as f64) * 100.0 / (finished as f64) >= pct
            {
                let why = format!(
                    "aborted: {failed} of {finished} finished executions failed (threshold {pct}%)"
                );
                return self.stop(&job.doc.id, JobState::Aborted, &why);
            }
        }
        if finished == report.total() {
            self.ledger.set_job_state(&job.doc.id, JobState::Done)?;
            tracing::info!(job_id = %job.doc.id, finished, failed = report.failed(), "job done");
        }
        Ok(())
    }

    /// Periodic work: roll out rate-limited jobs, time out executions still running past
    /// their job's timeout, end executions QUEUED past the offline expiry.
    pub fn tick(&mut self) -> Result<(), JobsError> {
        self.registry.note_hour(Utc::now())?;
        if self.key.is_none() {
            return Ok(());
        }
        self.expire_queued()?;
        let now = Utc::now();
        for job_id in self.ledger.job_ids(1000, true)? {
            let Some(job) = self.ledger.job(&job_id)? else {
                continue;
            };
            if job.rollout.max_per_minute.is_some() {
                self.roll_out(&job_id)?;
            }
            let limit = chrono::Duration::from_std(
                Duration::from_secs(job.doc.timeout_secs) + TIMEOUT_GRACE,
            )
            .unwrap_or(chrono::Duration::MAX);
            let timed_out: Vec<Execution> = self
                .ledger
                .running_since_before(&job_id, now - limit)?
                .into_iter()
                .map(|mut e| {
                    e.state = ExecutionState::TimedOut;
                    e.finished = Some(now);
                    e.reason = Some(format!(
                        "no result within the job's timeout ({}s) plus {}s",
                        job.doc.timeout_secs,
                        TIMEOUT_GRACE.as_secs()
                    ));
                    e
                })
                .collect();
            if !timed_out.is_empty() {
                self.ledger.update_executions(&job_id, &timed_out)?;
                for e in &timed_out {
                    self.announce_state(&job, e);
                }
                self.after_finish(&job)?;
            }
        }
        Ok(())
    }

    /// Ends TIMED_OUT the executions still QUEUED the offline expiry after they were last
    /// sent (their agent is offline or gone, as AWS IoT's queued-execution timeout does),
    /// and marks done the jobs that never had a target.
    fn expire_queued(&mut self) -> Result<(), JobsError> {
        let now = Utc::now();
        let cutoff = now - self.offline_expiry;
        let expired = self.ledger.queued_sent_before(cutoff, EXPIRE_BATCH)?;
        let mut by_job: std::collections::BTreeMap<String, Vec<Execution>> = Default::default();
        let hours = self.offline_expiry.num_seconds() as f64 / 3600.0;
        for (job_id, mut e) in expired {
            e.state = ExecutionState::TimedOut;
            e.finished = Some(now);
            e.reason = Some(format!(
                "never started: the agent did not pick the job up within the offline expiry ({hours}h, jobs.offline_expiry)"
            ));
            by_job.entry(job_id).or_default().push(e);
        }
        for (job_id, executions) in by_job {
            let Some(job) = self.ledger.job(&job_id)? else {
                continue;
            };
            self.ledger.update_executions(&job_id, &executions)?;
            for e in &executions {
                self.announce_state(&job, e);
            }
            tracing::info!(%job_id, executions = executions.len(), "queued executions expired");
            self.after_finish(&job)?;
        }
        for job_id in self.ledger.empty_jobs_created_before(cutoff)? {
            self.ledger.set_job_state(&job_id, JobState::Done)?;
            tracing::info!(%job_id, "job with no target ended at the offline expiry");
        }
        Ok(())
    }

    /// Sends a rate-limited job to as many not-yet-sent targets as its rate allows now.
    fn roll_out(&mut self, job_id: &str) -> Result<(), JobsError> {
        let Some(job) = self.ledger.job(job_id)? else {
            return Ok(());
        };
        let Some(rate) = job.rollout.max_per_minute else {
            return Ok(());
        };
        let now = Utc::now();
        let executions = self.ledger.executions(job_id)?;
        let minute_ago = now - chrono::Duration::seconds(60);
        let recent = executions
            .iter()
            .filter(|e| e.sent.is_some_and(|t| t > minute_ago))
            .count();
        let budget = (rate as usize).saturating_sub(recent);
        let next: Vec<String> = executions
            .iter()
            .filter(|e| e.sent.is_none() && e.state == ExecutionState::Queued)
            .take(budget)
            .map(|e| e.agent.clone())
            .collect();
        for agent in &next {
            self.send(agent_notify(agent), self.run_command(&job.doc)?);
        }
        if !next.is_empty() {
            self.ledger.mark_sent(job_id, &next, now)?;
        }
        Ok(())
    }

    fn announce_state(&self, job: &StoredJob, e: &Execution) {
        let event = JobEvent {
            agent: e.agent.clone(),
            kind: "job".into(),
            job_id: job.doc.id.clone(),
            operation: job.doc.operation.clone(),
            state: e.state,
            exit_code: e.exit_code,
            reason: e.reason.clone(),
            ts: Utc::now(),
        };
        match serde_json::to_vec(&event) {
            Ok(payload) => (self.announce)(fleetbus_protocol::jobs::event(&e.agent), payload),
            Err(e) => tracing::error!(error = %e, "cannot encode a job event"),
        }
    }
}

#[cfg(test)]
mod tests;
