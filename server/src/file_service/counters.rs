//! The file service's counters, shared with the metrics endpoint and the link consumer
//! (which counts what it sheds).

use std::sync::atomic::{AtomicU64, Ordering};

/// The file service's counters (also on the metrics endpoint).
#[derive(Debug, Default)]
pub struct FileCounters {
    /// Uploads started (an `init` for a file not in the spool).
    pub started: AtomicU64,
    /// Chunks written to the spool.
    pub chunks_stored: AtomicU64,
    /// Chunks already held (sent again after a reconnect or a lost reply).
    pub chunks_duplicate: AtomicU64,
    /// Chunks refused (hash, offset, length, unknown upload).
    pub chunks_rejected: AtomicU64,
    /// Chunks shed unread because the file service's queue was full (the agent is told
    /// they were lost when a later chunk arrives, and sends them again).
    pub chunks_shed: AtomicU64,
    /// Chunks reported lost to their agent (a later chunk of the upload arrived first).
    pub chunks_lost: AtomicU64,
    /// Control messages (init, status, finish, abort) shed because the file service's
    /// queue was full (the agent is answered `busy` and asks again).
    pub control_shed: AtomicU64,
    /// Bytes written to the spool.
    pub bytes_stored: AtomicU64,
    /// Files verified and handed to the rules engine.
    pub completed: AtomicU64,
    /// Files every target sink has written (their spool space freed).
    pub delivered: AtomicU64,
    /// Uploads refused: quota, size or manifest.
    pub refused: AtomicU64,
    /// Uploads aborted by their agent.
    pub aborted: AtomicU64,
    /// Uploads removed for inactivity (`files.ttl`).
    pub collected: AtomicU64,
    /// Spool bytes freed by abort and garbage collection.
    pub freed_bytes: AtomicU64,
    /// Messages that could not be decoded or are not allowed from agents.
    pub malformed: AtomicU64,
}

impl FileCounters {
    /// (metric suffix, help, value) of every counter.
    pub fn samples(&self) -> Vec<(&'static str, &'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "uploads_started_total",
                "Uploads started.",
                l(&self.started),
            ),
            (
                "chunks_stored_total",
                "File chunks written to the spool.",
                l(&self.chunks_stored),
            ),
            (
                "chunks_duplicate_total",
                "File chunks received again and already held.",
                l(&self.chunks_duplicate),
            ),
            (
                "chunks_rejected_total",
                "File chunks refused (hash, offset, length, unknown upload).",
                l(&self.chunks_rejected),
            ),
            (
                "chunks_shed_total",
                "File chunks dropped unread because the file service was behind (sent again).",
                l(&self.chunks_shed),
            ),
            (
                "chunks_lost_total",
                "File chunks reported lost to their agent (a later chunk arrived first).",
                l(&self.chunks_lost),
            ),
            (
                "control_shed_total",
                "File control messages (init, status, finish, abort) shed because the file service was behind (the agent is told busy and asks again).",
                l(&self.control_shed),
            ),
            (
                "bytes_stored_total",
                "File bytes written to the spool.",
                l(&self.bytes_stored),
            ),
            (
                "completed_total",
                "Files verified and handed to the rules engine.",
                l(&self.completed),
            ),
            (
                "delivered_total",
                "Files written by every sink they were routed to.",
                l(&self.delivered),
            ),
            (
                "refused_total",
                "Uploads refused (quota, size, manifest).",
                l(&self.refused),
            ),
            (
                "aborted_total",
                "Uploads aborted by their agent.",
                l(&self.aborted),
            ),
            (
                "collected_total",
                "Idle uploads removed after files.ttl.",
                l(&self.collected),
            ),
            (
                "freed_bytes_total",
                "Spool bytes freed by abort and garbage collection.",
                l(&self.freed_bytes),
            ),
            (
                "malformed_total",
                "File messages that could not be decoded or are not allowed.",
                l(&self.malformed),
            ),
        ]
    }
}
