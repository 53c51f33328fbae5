//! The server's write-ahead log (WAL): every accepted message is appended here before the
//! agent is told it is safe, and every sink reads from here at its own pace.
//!
//! - [`Wal`]: a [`fleetbus_seglog::SegLog`] behind a mutex with *group commit*: appends are
//!   buffered, [`Wal::commit`] makes everything appended so far durable with one `fsync`
//!   taken outside the lock, and publishes the durable index to readers.
//! - [`WalEntry`]: what one entry holds (the original payload, the sinks it goes to, its
//!   record key for de-duplication, and dead-letter details when it is one).
//! - [`Dedup`]: which (agent, stream, epoch, seq) were already accepted, as range sets,
//!   with a snapshot file so the log can be truncated without forgetting them.

mod dedup;
mod entry;
mod log;

pub use dedup::{Dedup, DedupLimits, RangeSet, StreamKey};
pub use entry::{DeadLetter, Produced, RecordKey, WalEntry};
pub use log::{Wal, WalError, WalOptions};
