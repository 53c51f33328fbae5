//! Small building blocks that several fleetbus crates need and that belong to none of them:
//!
//! - [`durable`]: replacing a file so that after a crash or a power loss it holds either
//!   the old or the new content, never a mix, and the new name is on disk (write a
//!   temporary file, fsync it, rename it, fsync the directory);
//! - [`lock`]: one process per state directory (an exclusive lock file);
//! - [`ports`]: free loopback ports for tests and the demo, never the same twice;
//! - [`publish`]: the one handle services publish to the broker through;
//! - [`throttle`]: logging an error that repeats at a bounded rate, with a count of what
//!   was left out, so a full disk or a spinning loop cannot flood the log;
//! - [`error_chain`]: an error's text with its sources.
//!
//! It depends on nothing of ours (std, `tracing` and `thiserror` only), so every crate, the chunker
//! included, may use it.

pub mod durable;
pub mod lock;
pub mod ports;
pub mod publish;
pub mod throttle;

pub use durable::{create_dir, replace_file, sync_dir};
pub use lock::{lock_dir, DirLock, LockError};
pub use ports::free_port;
pub use publish::{NotPublished, Publisher};
pub use throttle::Throttle;

/// An error with its sources, one after the other (a client library's top-level text
/// alone often says little: reqwest's "error sending request", tokio-postgres's "error
/// connecting to server").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
