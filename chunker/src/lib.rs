//! Large files as a sequence of verified chunks, with no transport in sight.
//!
//! - [`Manifest`]: what a file is (id, name, size, SHA-256 of the whole, chunk size and
//!   count, content type, user metadata), computed by [`Manifest::for_reader`] in one
//!   streaming pass.
//! - [`Splitter`]: reads a file chunk by chunk ([`Chunk`]: index, offset, bytes, SHA-256),
//!   in any order (only the missing ones after a resume), holding one chunk in memory.
//! - [`Reassembler`]: the receiving side. Writes chunks at their offsets into a spool file,
//!   accepts duplicates and any order, rejects a chunk that disagrees with the manifest
//!   (saying which field), enforces a maximum file size and a per-owner spool quota,
//!   survives restarts (held chunks are persisted), verifies the whole-file SHA-256 before it
//!   declares a file complete, aborts and garbage-collects idle partial uploads.
//!
//! Nothing here holds a whole file in memory.

mod error;
mod manifest;
mod reassemble;
mod split;

pub use error::{ChunkError, Rejection};
pub use manifest::{Manifest, Sha256Hex};
pub use reassemble::{Completed, GcReport, Limits, PutOutcome, Reassembler, UploadStatus};
pub use split::{Chunk, Splitter};
