//! The ingest pipeline: what happens to a message between the broker and the sinks.
//!
//! - [`engine`]: de-duplication, backpressure, append to the write-ahead log, group commit,
//!   end-to-end acknowledgements, the de-duplication snapshot, sink start-up;
//! - [`worker`]: one task per sink, reading the log at the sink's own pace, batching,
//!   retrying, dead letters, saving its position ([`position`]);
//! - [`reload`]: new rules put in effect without losing a message (the switch at a message
//!   boundary, sinks kept, restarted, or drained);
//! - [`tap`]: a bounded live view of what the engine does with some topics' messages;
//! - [`groups`]: each agent's groups, stamped onto its messages at ingest;
//! - [`tail`]: the newest log entries kept in memory, so a sink that keeps up never reads
//!   the disk;
//! - [`standalone`]: the engine fed from any MQTT broker (`fleetbus rules run`);
//! - [`inventory`]: what a file sink wrote, per agent and stream (the demo's and the tests'
//!   delivery check).
//!
//! The rules language it runs is `fleetbus-rules`; the destinations are `fleetbus-sinks`.

pub mod engine;
pub mod groups;
pub mod inventory;
pub mod position;
pub mod reload;
pub mod standalone;
pub mod tail;
pub mod tap;
mod topology;
pub mod worker;

pub use engine::{Dispatched, Engine, EngineOptions, EngineStats};
pub use reload::{ReloadReport, ReloadStatus};
pub use standalone::{run_standalone, AckChannel, StandaloneOptions};
pub use tail::{TailCache, TailEntry};
pub use worker::{spawn_sink, DeadLetters, SinkHandle, SinkStats, SinkStatsSnapshot};
