//! `[files]`: the file service's limits and retention, and what serde cannot check.

use std::time::Duration;

use fleetbus_protocol::files;
use serde::{Deserialize, Serialize};

/// `[files]`: limits and retention of the file service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSection {
    /// Largest file accepted, in bytes.
    pub max_file_size: u64,
    /// Most spool bytes one agent's uploads may occupy (unfinished and not yet delivered).
    pub quota_per_agent: u64,
    /// Largest chunk accepted, in bytes (a chunk message must fit 128 KiB).
    pub max_chunk_size: u32,
    /// Smallest chunk accepted, in bytes (a file smaller than it is one chunk).
    pub min_chunk_size: u32,
    /// Most chunks one file may have: the server keeps a bit per chunk, and every chunk
    /// is a message, a write and a reply.
    pub max_chunks: u32,
    /// Most unfinished uploads one agent may have in the spool at once.
    pub max_uploads_per_agent: usize,
    /// An upload with no activity for this long is removed from the spool (counted as
    /// garbage collected); so is a verified file no rule routes.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a delivered file is remembered, so uploading it again is answered at once.
    #[serde(with = "humantime_serde")]
    pub remember: Duration,
    /// The spool is fsynced and the list of held chunks saved every this many chunks (and
    /// before every status answer): a server crash costs at most this many chunks sent
    /// again.
    pub persist_every: u32,
}

impl Default for FilesSection {
    fn default() -> Self {
        FilesSection {
            max_file_size: 4 << 30,
            quota_per_agent: 8 << 30,
            max_chunk_size: 128 * 1024,
            min_chunk_size: 1024,
            max_chunks: 1 << 20,
            max_uploads_per_agent: 64,
            ttl: Duration::from_secs(24 * 3600),
            remember: Duration::from_secs(7 * 24 * 3600),
            persist_every: 512,
        }
    }
}

/// What serde cannot check (keys relative to `[files]`).
impl fleetbus_config::Check for FilesSection {
    fn check(&self, p: &mut fleetbus_config::Problems) {
        p.require(
            self.max_chunk_size > 0 && self.max_chunk_size as usize <= files::MAX_PUBLISH_BYTES,
            "max_chunk_size",
            format!("must be between 1 and {}", files::MAX_PUBLISH_BYTES),
        );
        p.require(
            self.quota_per_agent >= self.max_file_size.min(1 << 20),
            "quota_per_agent",
            "must be at least 1 MiB",
        );
        p.require(
            self.min_chunk_size > 0 && self.min_chunk_size <= self.max_chunk_size,
            "min_chunk_size",
            "must be between 1 and files.max_chunk_size",
        );
        p.require(
            self.max_chunks > 0 && self.max_chunks <= 1 << 24,
            "max_chunks",
            "must be between 1 and 16777216",
        );
        p.require(
            self.max_uploads_per_agent > 0,
            "max_uploads_per_agent",
            "must be at least 1",
        );
        p.require(
            self.persist_every > 0,
            "persist_every",
            "must be at least 1",
        );
        p.require(
            self.ttl >= Duration::from_secs(1),
            "ttl",
            "must be at least 1s",
        );
    }
}
