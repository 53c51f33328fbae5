//! The file service: receives chunked uploads (`fleet/{agent}/files/{file_id}/...`),
//! reassembles and verifies them in the spool, publishes a completion message through the
//! rules engine (rules route it like any other message), answers the agent on
//! `fleet/{agent}/replies/files`, and removes a file from the spool once every sink its
//! completion went to has written it.
//!
//! It runs on a thread of its own (every step is blocking disk I/O) fed by a bounded
//! channel, so a slow disk slows the uploads, never telemetry.
//!
//! On disk, under `data_dir/files/`:
//! - `spool/{agent}/{file_id}/`: the chunker's upload state, plus `delivery.json` (the log
//!   index of the completion message and the sinks it went to) once verified;
//! - `delivered/{agent}/{file_id}`: a note that the file was delivered, kept for
//!   `files.remember`, so uploading the same file again is answered "complete" at once.
//!
//! Laid out like the job service: [`config`] (`[files]`), [`counters`], `queue` (what the
//! link consumer hands in, and what it sheds), `service` (the thread), `delivery` (which
//! sinks still need a file) and `replies` (what an outcome tells the agent).

pub mod config;
pub mod counters;
mod delivery;
mod queue;
mod replies;
mod service;

pub use config::FilesSection;
pub use counters::FileCounters;
pub(crate) use queue::{spawn, FileQueue, ShedChunks};
pub(crate) use service::FileService;
