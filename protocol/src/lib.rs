//! The fleetbus wire contract: topic layout, telemetry records, presence messages, file
//! transfer messages, job commands and statuses, and the decoded message envelope the server routes. No I/O lives here.
//!
//! See `docs/protocol.md` for the human-readable description of everything in this crate.

pub mod ack;
pub mod broker_events;
pub mod check;
pub mod enroll;
pub mod files;
pub mod ids;
pub mod jobs;
pub mod json_body;
pub mod message;
pub mod presence;
pub mod range;
pub mod record;
pub mod topics;

pub use ack::{Ack, StreamAck};
pub use broker_events::BrokerEvent;
pub use check::{CheckResult, CheckState, StateType};
pub use enroll::{EnrollReply, EnrollRequest};
pub use files::{
    ChunkOutcome, FileAction, FileChunk, FileCompleted, FileInit, FileManifest, FileReply,
    RefusalKind,
};
pub use ids::{validate_id, IdError};
pub use jobs::{
    ExecutionState, JobCommand, JobDocument, JobEvent, JobStatus, JobTarget, SignedCommand,
};
pub use json_body::write_json_body;
pub use message::{DecodeError, EncodeError, Message};
pub use presence::{CloudIdentity, Presence, PresenceStatus};
pub use range::{Range, RangeError};
pub use record::{Event, Metric, Record, Resource, Severity};
pub use topics::Topic;
