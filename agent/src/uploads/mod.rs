//! File uploads: a persistent queue of files ([`UploadQueue`]), the sender that moves the
//! current one over the agent's connection ([`transfer`]), and the watcher that queues the
//! files dropped into `uploads.watch_dir` ([`watch`]).

pub mod queue;
pub(crate) mod transfer;
pub mod watch;

pub use queue::{AfterUpload, UploadJob, UploadOutcome, UploadProgress, UploadQueue, UploadStats};
