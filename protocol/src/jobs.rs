//! Jobs: signed commands the server sends to one agent or a whole group, and the status
//! updates agents send back.
//!
//! | topic | direction | content |
//! |---|---|---|
//! | `fleet/{agent}/jobs/notify` | server → one agent | [`SignedCommand`] |
//! | `fleet/groups/{group}/jobs/notify` | server → every member of a group | [`SignedCommand`] |
//! | `fleet/{agent}/jobs/status` | agent → server | [`JobStatus`] |
//! | `fleet/{agent}/jobs/event` | server → rules engine only | [`JobEvent`] (JSON) |
//!
//! A command travels as the exact JSON bytes that were signed (`body`) beside an Ed25519
//! signature over them, so the receiver verifies what it received and only then parses it:
//! nothing depends on re-serialising the same JSON twice.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::topics::{GROUPS, ROOT};

/// Topic on which the server sends `agent` its jobs.
pub fn agent_notify(agent: &str) -> String {
    format!("{ROOT}/{agent}/jobs/notify")
}

/// Topic on which the server sends a job to every member of `group` with one publish.
pub fn group_notify(group: &str) -> String {
    format!("{ROOT}/{GROUPS}/{group}/jobs/notify")
}

/// Topic on which `agent` reports the state of its executions.
pub fn status(agent: &str) -> String {
    format!("{ROOT}/{agent}/jobs/status")
}

/// Topic of the server's job state change messages about `agent`'s execution (they go
/// through the rules engine, never through the broker).
pub fn event(agent: &str) -> String {
    format!("{ROOT}/{agent}/jobs/event")
}

/// Topic filter matching every job state change message.
pub const ALL_JOB_EVENTS: &str = "fleet/+/jobs/event";

/// Who a job is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobTarget {
    /// One agent, by id.
    Agent(String),
    /// Every member of a group (agents announce their groups in their birth message).
    Group(String),
}

impl std::fmt::Display for JobTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobTarget::Agent(a) => write!(f, "agent {a}"),
            JobTarget::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// The job document: what to run, with which arguments, for how long at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDocument {
    /// Unique id (chosen by the server).
    pub id: String,
    /// The operation: a handler name the agent allow-lists in its configuration.
    pub operation: String,
    /// Arguments, each validated by the agent against its handler's pattern.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// Most seconds one execution may take (the agent kills it after; the server marks
    /// targets still running after it TIMED_OUT).
    pub timeout_secs: u64,
    /// When the job was created.
    pub created: DateTime<Utc>,
    /// Who it is for.
    pub target: JobTarget,
}

/// How far an agent's clock may be behind or ahead of the server's before a fresh command
/// looks expired (or an expired one fresh): agents accept a command until `expires` plus
/// this.
pub const CLOCK_SKEW_SECS: i64 = 300;

/// Largest signed command (the job document with its arguments) the server publishes: it
/// must fit a publish with room to spare (`broker.max_payload_bytes` is at least 132 KiB).
/// AWS IoT allows 32 KB job documents; a push beyond this is refused.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// What the server tells agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobCommand {
    /// Run this job (once: an agent never runs the same job id twice).
    Run {
        /// The job.
        job: JobDocument,
        /// After this time (plus [`CLOCK_SKEW_SECS`] of clock difference) agents refuse the
        /// command: the server signs a fresh one for every send, so a command captured on
        /// the wire cannot be replayed later.
        expires: DateTime<Utc>,
    },
    /// Do not start this job (one already running finishes).
    Cancel {
        /// The job's id.
        job_id: String,
        /// When it was cancelled.
        ts: DateTime<Utc>,
    },
}

impl JobCommand {
    /// The id of the job the command is about.
    pub fn job_id(&self) -> &str {
        match self {
            JobCommand::Run { job, .. } => &job.id,
            JobCommand::Cancel { job_id, .. } => job_id,
        }
    }

    /// Serialises and signs the command.
    pub fn sign(&self, key: &SigningKey) -> Result<SignedCommand, serde_json::Error> {
        let body = serde_json::to_string(self)?;
        let signature = key.sign(body.as_bytes());
        Ok(SignedCommand {
            body,
            signature: hex::encode(signature.to_bytes()),
        })
    }
}

/// A command as it travels: the JSON that was signed, and its Ed25519 signature (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    /// The command's JSON text, exactly as signed.
    pub body: String,
    /// Ed25519 signature of `body`'s bytes, 64 bytes as hex.
    pub signature: String,
}

/// Why a command was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not a signed command at all.
    #[error("not a signed job command: {0}")]
    Malformed(String),
    /// The signature is missing, malformed or does not match the body and key.
    #[error("bad signature: {0}")]
    BadSignature(String),
}

impl SignedCommand {
    /// Encodes for the wire (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Decodes `payload`, checks the signature with `key`, then parses the command.
    pub fn verify(payload: &[u8], key: &VerifyingKey) -> Result<JobCommand, CommandError> {
        let signed: SignedCommand =
            serde_json::from_slice(payload).map_err(|e| CommandError::Malformed(e.to_string()))?;
        let bytes = hex::decode(&signed.signature)
            .map_err(|e| CommandError::BadSignature(format!("not hex: {e}")))?;
        let bytes: [u8; 64] = bytes
            .try_into()
            .map_err(|_| CommandError::BadSignature("not 64 bytes".into()))?;
        key.verify(signed.body.as_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| CommandError::BadSignature("does not match the job signing key".into()))?;
        serde_json::from_str(&signed.body).map_err(|e| CommandError::Malformed(e.to_string()))
    }

    /// The job id the body claims, without checking anything (for reporting a rejection).
    pub fn claimed_job_id(payload: &[u8]) -> Option<String> {
        let signed: SignedCommand = serde_json::from_slice(payload).ok()?;
        let command: JobCommand = serde_json::from_str(&signed.body).ok()?;
        Some(command.job_id().to_string())
    }
}

/// Parses a public (verifying) key from hex.
pub fn verifying_key_from_hex(text: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes (64 hex digits)".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

/// Parses a secret (signing) key from hex.
pub fn signing_key_from_hex(text: &str) -> Result<SigningKey, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an Ed25519 secret key is 32 bytes (64 hex digits)".to_string())?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Where one target's execution of a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionState {
    /// Known to the server, not started by the agent (offline, or waiting for rollout).
    Queued,
    /// The agent started it.
    InProgress,
    /// Finished with exit code 0.
    Succeeded,
    /// Finished with another exit code, or could not be started.
    Failed,
    /// Ran longer than its timeout (the agent killed it), or the server gave up waiting.
    TimedOut,
    /// The agent refused it: bad signature, unknown operation, argument not matching.
    Rejected,
    /// Cancelled before it started.
    Canceled,
}

impl ExecutionState {
    /// True for states an execution never leaves.
    pub fn is_terminal(self) -> bool {
        !matches!(self, ExecutionState::Queued | ExecutionState::InProgress)
    }

    /// The name used on the wire and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionState::Queued => "QUEUED",
            ExecutionState::InProgress => "IN_PROGRESS",
            ExecutionState::Succeeded => "SUCCEEDED",
            ExecutionState::Failed => "FAILED",
            ExecutionState::TimedOut => "TIMED_OUT",
            ExecutionState::Rejected => "REJECTED",
            ExecutionState::Canceled => "CANCELED",
        }
    }

    /// Parses [`ExecutionState::as_str`]'s names.
    pub fn parse(text: &str) -> Option<ExecutionState> {
        ALL_STATES.into_iter().find(|s| s.as_str() == text)
    }
}

/// Every execution state, in order.
pub const ALL_STATES: [ExecutionState; 7] = [
    ExecutionState::Queued,
    ExecutionState::InProgress,
    ExecutionState::Succeeded,
    ExecutionState::Failed,
    ExecutionState::TimedOut,
    ExecutionState::Rejected,
    ExecutionState::Canceled,
];

impl std::fmt::Display for ExecutionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agent's report about one execution (sent on every state change, and again whenever
/// the server sends a job the agent already knows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job_id: String,
    /// Where it stands on this agent.
    pub state: ExecutionState,
    /// When the agent started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<DateTime<Utc>>,
    /// The process's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The head of stdout and stderr (bounded by the agent's `jobs.output_limit`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// Why it was rejected, failed or timed out, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl JobStatus {
    /// Encodes for the wire (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// A state change of one execution, published by the server into the rules engine on
/// [`event`] so rules can route it (to an audit sink, for example).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// The target agent.
    pub agent: String,
    /// Always `"job"`.
    pub kind: String,
    /// The job.
    pub job_id: String,
    /// Its operation.
    pub operation: String,
    /// The new state.
    pub state: ExecutionState,
    /// Exit code, when finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why, when there is a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the server saw the change.
    pub ts: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> JobDocument {
        JobDocument {
            id: "j1".into(),
            operation: "restart-service".into(),
            args: BTreeMap::from([("name".into(), "nginx".into())]),
            timeout_secs: 60,
            created: Utc::now(),
            target: JobTarget::Group("web".into()),
        }
    }

    #[test]
    fn a_signed_command_verifies_and_a_tampered_one_does_not() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let command = JobCommand::Run {
            job: doc(),
            expires: Utc::now(),
        };
        let signed = command.sign(&key).unwrap();
        let payload = signed.encode().unwrap();
        assert_eq!(
            SignedCommand::verify(&payload, &key.verifying_key()).unwrap(),
            command
        );
        // another key
        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(matches!(
            SignedCommand::verify(&payload, &other.verifying_key()),
            Err(CommandError::BadSignature(_))
        ));
        // a changed argument
        let tampered = SignedCommand {
            body: signed.body.replace("nginx", "sshd"),
            ..signed.clone()
        };
        assert!(matches!(
            SignedCommand::verify(&tampered.encode().unwrap(), &key.verifying_key()),
            Err(CommandError::BadSignature(_))
        ));
        // unsigned
        let unsigned = format!(r#"{{"body": {:?}, "signature": ""}}"#, signed.body);
        assert!(matches!(
            SignedCommand::verify(unsigned.as_bytes(), &key.verifying_key()),
            Err(CommandError::BadSignature(_))
        ));
        assert_eq!(
            SignedCommand::claimed_job_id(unsigned.as_bytes()).as_deref(),
            Some("j1")
        );
        assert!(matches!(
            SignedCommand::verify(b"{}", &key.verifying_key()),
            Err(CommandError::Malformed(_))
        ));
    }

    #[test]
    fn topics_parse_as_job_topics() {
        use crate::Topic;
        assert_eq!(
            Topic::parse(&agent_notify("a")),
            Topic::AgentJobs {
                agent: "a",
                rest: "notify"
            }
        );
        assert_eq!(
            Topic::parse(&group_notify("web")),
            Topic::GroupJobs {
                group: "web",
                rest: "notify"
            }
        );
        assert_eq!(
            Topic::parse(&status("a")),
            Topic::AgentJobs {
                agent: "a",
                rest: "status"
            }
        );
    }

    #[test]
    fn states_round_trip_by_name() {
        for s in ALL_STATES {
            assert_eq!(ExecutionState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!(ExecutionState::Succeeded.is_terminal());
        assert!(!ExecutionState::InProgress.is_terminal());
    }
}
