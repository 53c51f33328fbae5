//! The job service and the agent registry inside `fleetbus serve`: their own thread (every
//! step writes SQLite), fed with agents' presence and status messages by the engine's link
//! consumer (checked here first: a birth message speaks only for its own agent, and with
//! security enforced its groups are its credential's) and with operators' requests by the
//! admin endpoint. It always runs: without
//! `jobs.signing_key` it keeps the registry and job requests answer that jobs are off.

use std::path::Path;

use std::time::Duration;

use fleetbus_broker::Guard;
use fleetbus_jobs::{
    AgentDetail, AgentFilter, Forgotten, HourCount, JobReport, JobService, JobsError, KnownAgent,
    PushRequest,
};
use fleetbus_protocol::{JobStatus, Presence};
use tokio::sync::{mpsc, oneshot};

/// An operator's request and where its answer goes.
pub enum Request {
    /// Push a job.
    Push(PushRequest, oneshot::Sender<Result<JobReport, JobsError>>),
    /// One job with every execution.
    Report(String, oneshot::Sender<Result<JobReport, JobsError>>),
    /// One job with counts per state only.
    Summary(String, oneshot::Sender<Result<JobReport, JobsError>>),
    /// The newest jobs.
    List(usize, oneshot::Sender<Result<Vec<JobReport>, JobsError>>),
    /// Cancel a job.
    Cancel(String, oneshot::Sender<Result<JobReport, JobsError>>),
    /// Agents known from presence messages that a filter keeps.
    Agents(
        AgentFilter,
        oneshot::Sender<Result<Vec<KnownAgent>, JobsError>>,
    ),
    /// One agent and its latest executions.
    Agent(String, oneshot::Sender<Result<AgentDetail, JobsError>>),
    /// Agents online per hour since a time (of a group, of a role).
    Hours(
        HoursQuery,
        oneshot::Sender<Result<Vec<HourCount>, JobsError>>,
    ),
    /// Forget an agent.
    Forget(String, oneshot::Sender<Result<Forgotten, JobsError>>),
}

/// `GET /agents/hours`: agents online per hour.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct HoursQuery {
    /// Hours back from now (default 168: a week; at most 35 days, as long as they are kept).
    pub hours: Option<u32>,
    /// Only members of this group.
    pub group: Option<String>,
    /// Only agents of this role (the cloud identity's).
    pub role: Option<String>,
}

/// What the job service thread is fed.
pub enum JobInput {
    /// An agent's birth or last-will message.
    Presence(Box<Presence>),
    /// An agent's status report.
    Status(String, JobStatus),
    /// An operator's request.
    Request(Request),
    /// Time for rollout and timeouts.
    Tick,
}

/// Handle to the running job service.
#[derive(Clone)]
pub struct JobsHandle {
    tx: mpsc::Sender<JobInput>,
}

impl JobsHandle {
    /// Feeds a message (waits for room: presence and status must not be dropped).
    pub async fn send(&self, input: JobInput) {
        if self.tx.send(input).await.is_err() {
            tracing::error!("job service stopped; message dropped");
        }
    }

    /// Hands an agent's job status report to the service (nothing else reads it).
    pub async fn status(&self, agent: &str, payload: &[u8]) {
        match fleetbus_protocol::message::decode_as::<JobStatus>(payload) {
            Ok(status) => self.send(JobInput::Status(agent.to_string(), status)).await,
            Err(e) => tracing::warn!(%agent, error = %e, "unreadable job status ignored"),
        }
    }

    /// Hands a presence message published on `agent`'s `topic` to the service, with the
    /// groups of the agent's credential when security is enforced.
    pub async fn presence(
        &self,
        guard: &Guard,
        agent: &str,
        topic: &str,
        payload: &[u8],
    ) -> PresenceVerdict {
        match Presence::decode(payload) {
            Ok(p) if p.agent != agent => {
                // the topic's agent is the only identity: a birth message naming another
                // agent would move it between groups
                refuse_presence(guard, agent, topic, &p.agent);
                return PresenceVerdict::Refused;
            }
            Ok(mut p) => {
                enrolled_groups(guard, agent, &mut p);
                let groups = (p.status == fleetbus_protocol::PresenceStatus::Online)
                    .then(|| p.groups.clone());
                self.send(JobInput::Presence(Box::new(p))).await;
                return PresenceVerdict::Routed { groups };
            }
            Err(e) => tracing::debug!(%topic, error = %e, "unreadable presence message"),
        }
        PresenceVerdict::Routed { groups: None }
    }

    /// Asks the service and waits for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, JobsError>>) -> Request,
    ) -> Result<T, JobsError> {
        let (tx, rx) = oneshot::channel();
        self.send(JobInput::Request(make(tx))).await;
        rx.await
            .map_err(|_| JobsError::Request("the job service stopped".into()))?
    }
}

/// What becomes of a presence message.
#[derive(Debug, PartialEq, Eq)]
pub enum PresenceVerdict {
    /// It names another agent than its topic's: refused, it must not reach the rules either.
    Refused,
    /// It goes on to the rules. `groups`: the agent's groups from now on, when it is a birth
    /// message (the credential's when security is enforced).
    Routed {
        /// The groups that count, for a birth message.
        groups: Option<Vec<String>>,
    },
}

/// Most presence and status messages applied in one ledger transaction.
const BATCH: usize = 2048;

/// How often rollout and timeouts are checked.
const TICK: Duration = Duration::from_millis(500);

/// Loads the signing key (if any) and starts the service thread and its ticker.
pub(crate) fn start(
    data_dir: &Path,
    section: &crate::JobsSection,
    publish: fleetbus_support::Publisher,
    announce: fleetbus_jobs::Announce,
    stop: crate::shutdown::StopSignal,
) -> Result<
    (
        JobsHandle,
        std::thread::JoinHandle<()>,
        tokio::task::JoinHandle<()>,
    ),
    crate::ServerError,
> {
    use crate::ServerError;
    let key = match &section.signing_key {
        Some(key_file) => {
            let unusable = |reason: String| ServerError::SigningKey {
                path: key_file.clone(),
                reason,
            };
            let text = std::fs::read_to_string(key_file).map_err(|e| unusable(e.to_string()))?;
            let key = fleetbus_protocol::jobs::signing_key_from_hex(&text)
                .map_err(|e| unusable(e.to_string()))?;
            Some(key)
        }
        None => None,
    };
    let mut service = JobService::open(data_dir, key, publish, announce)?
        .with_command_ttl(section.command_ttl)
        .with_offline_expiry(section.offline_expiry);
    let (tx, mut rx) = mpsc::channel::<JobInput>(4096);
    let span = tracing::info_span!("jobs");
    let thread = std::thread::Builder::new()
        .name("fleetbus-jobs".into())
        .spawn(move || {
            let _entered = span.enter();
            let mut batch = Vec::with_capacity(BATCH);
            while let Some(input) = rx.blocking_recv() {
                // presence and status messages that queued up meanwhile go into one ledger
                // transaction; a request or tick ends the batch and runs after it
                let mut after = None;
                let mut next = Some(input);
                while let Some(input) = next.take() {
                    match input {
                        JobInput::Presence(_) | JobInput::Status(..) => batch.push(input),
                        other => {
                            after = Some(other);
                            break;
                        }
                    }
                    if batch.len() < BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    apply_batch(&mut service, &mut batch);
                }
                if let Some(input) = after {
                    handle(&mut service, input);
                }
            }
        })
        .map_err(|source| ServerError::Thread {
            what: "the job service",
            source,
        })?;
    let ticker = crate::ticker::spawn(tx.clone(), TICK, || JobInput::Tick, stop);
    Ok((JobsHandle { tx }, thread, ticker))
}

/// Applies queued presence and status messages in one ledger transaction (emptying
/// `batch`). A message that fails is logged and the others still apply.
fn apply_batch(service: &mut JobService, batch: &mut Vec<JobInput>) {
    let n = batch.len();
    let applied = service.batch(|service| {
        for input in batch.drain(..) {
            let result = match input {
                JobInput::Presence(p) => service.on_presence(&p),
                JobInput::Status(agent, status) => service.on_status(&agent, status),
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "job service");
            }
        }
    });
    if let Err(e) = applied {
        // not on disk: agents send their reports again when they reconnect and the job
        // is re-sent to them (they answer from their records)
        tracing::error!(error = %e, messages = n, "job ledger: a batch of presence and status messages was not stored");
    }
    batch.clear();
}

fn handle(service: &mut JobService, input: JobInput) {
    let result = match input {
        JobInput::Presence(p) => service.on_presence(&p),
        JobInput::Status(agent, status) => service.on_status(&agent, status),
        JobInput::Tick => service.tick(),
        JobInput::Request(r) => {
            match r {
                Request::Push(req, reply) => {
                    let _ = reply.send(service.push(req));
                }
                Request::Report(id, reply) => {
                    let _ = reply.send(service.report(&id));
                }
                Request::Summary(id, reply) => {
                    let _ = reply.send(service.summary(&id));
                }
                Request::List(limit, reply) => {
                    let _ = reply.send(service.list(limit));
                }
                Request::Cancel(id, reply) => {
                    let _ = reply.send(service.cancel(&id));
                }
                Request::Agents(filter, reply) => {
                    let _ = reply.send(service.agents(&filter));
                }
                Request::Agent(id, reply) => {
                    let _ = reply.send(service.agent(&id));
                }
                Request::Hours(q, reply) => {
                    let hours = i64::from(q.hours.unwrap_or(168).min(35 * 24));
                    let since = chrono::Utc::now() - chrono::Duration::hours(hours);
                    let _ = reply.send(service.hours(since, q.group.as_deref(), q.role.as_deref()));
                }
                Request::Forget(agent, reply) => {
                    let _ = reply.send(service.forget(&agent));
                }
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "job service");
    }
}

/// With security enforced, an agent's groups are those of its credential, not those its
/// birth message claims (a rogue agent must not count as a member of another group).
fn enrolled_groups(guard: &Guard, agent: &str, presence: &mut Presence) {
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
fn refuse_presence(guard: &Guard, agent: &str, topic: &str, claimed: &str) {
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
