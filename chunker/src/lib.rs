//! Large files as a sequence of verified chunks, with no transport in sight.
//!
//! - [`manifest_of`]: what a file is (the protocol's [`FileManifest`]: id, name, size,
//!   SHA-256 of the whole, chunk size and count, content type, user metadata), computed in
//!   one streaming pass.
//! - [`Splitter`]: reads a file chunk by chunk ([`Chunk`]: index, offset, bytes, SHA-256),
//!   in any order (only the missing ones after a resume), holding one chunk in memory.
//! - [`Reassembler`]: the receiving side. Writes chunks at their offsets into a spool file,
//!   accepts duplicates and any order, rejects a chunk that disagrees with the manifest
//!   (saying which field), enforces a maximum file size and a per-owner spool quota,
//!   survives restarts (held chunks are persisted), verifies the whole-file SHA-256 before it
//!   declares a file complete, aborts and garbage-collects idle partial uploads.
//!
//! - [`spool`]: the spool's layout under a server's data directory, the one place it is
//!   written down.
//!
//! Nothing here holds a whole file in memory. Its one dependency of ours is the protocol,
//! for the manifest type the wire carries.

mod error;
mod manifest;
mod reassemble;
mod split;
pub mod spool;

pub use error::{ChunkError, Rejection};
pub use fleetbus_protocol::FileManifest;
pub use manifest::{manifest_of, Sha256Hex};
pub use reassemble::{Completed, GcReport, Limits, PutOutcome, Reassembler, UploadStatus};
pub use split::{Chunk, Splitter};
