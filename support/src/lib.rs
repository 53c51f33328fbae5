//! Small building blocks that several fleetbus crates need and that belong to none of them:
//!
//! - [`durable`]: replacing a file so that after a crash or a power loss it holds either
//!   the old or the new content, never a mix, and the new name is on disk (write a
//!   temporary file, fsync it, rename it, fsync the directory);
//! - [`lock`]: one process per state directory (an exclusive lock file);
//! - [`ports`]: free loopback ports for tests and the demo, never the same twice;
//! - [`publish`]: the one handle services publish to the broker through;
//! - [`throttle`]: logging an error that repeats at a bounded rate, with a count of what
//!   was left out, so a full disk or a spinning loop cannot flood the log.
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
