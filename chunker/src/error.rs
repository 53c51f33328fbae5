//! What can go wrong with a chunked file.

use std::path::PathBuf;

/// Why a manifest or a chunk was refused. Each says which field disagreed, so the sender
/// (and the operator reading its log) knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The manifest contradicts itself or the limits.
    #[error("manifest rejected: {0}")]
    Manifest(String),
    /// The owner (agent id) cannot name a spool directory.
    #[error(
        "owner {0:?} is not a usable agent id (1-128 characters of [A-Za-z0-9._-], not . or ..)"
    )]
    Owner(String),
    /// The file is larger than the configured maximum.
    #[error("file of {size} bytes exceeds the maximum file size of {max} bytes")]
    TooLarge {
        /// Declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Accepting the file would exceed the owner's spool quota.
    #[error("spool quota exceeded for `{owner}`: {used} bytes in use + {size} requested > {quota} bytes")]
    QuotaExceeded {
        /// Whose quota.
        owner: String,
        /// Bytes of that owner's unfinished uploads already spooled.
        used: u64,
        /// Bytes this upload needs.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// The owner already has as many unfinished uploads as it may.
    #[error("`{owner}` already has {uploads} unfinished uploads (the most allowed): finish or abort one first")]
    TooManyUploads {
        /// Whose uploads.
        owner: String,
        /// Its unfinished uploads.
        uploads: usize,
    },
    /// A chunk's index is beyond the manifest's chunk count.
    #[error("chunk {index}: index out of range (the file has {count} chunks)")]
    IndexOutOfRange {
        /// The chunk.
        index: u32,
        /// Chunks in the file.
        count: u32,
    },
    /// A chunk's offset is not where the manifest puts it.
    #[error("chunk {index}: offset {offset} disagrees with the manifest (expected {expected})")]
    Offset {
        /// The chunk.
        index: u32,
        /// Offset the chunk claims.
        offset: u64,
        /// Offset the manifest implies.
        expected: u64,
    },
    /// A chunk's length is not what the manifest implies.
    #[error("chunk {index}: length {len} disagrees with the manifest (expected {expected})")]
    Length {
        /// The chunk.
        index: u32,
        /// Bytes received.
        len: usize,
        /// Bytes expected.
        expected: u64,
    },
    /// A chunk's bytes do not hash to the SHA-256 sent with it.
    #[error("chunk {index}: SHA-256 mismatch (sent {declared}, data hashes to {actual})")]
    ChunkHash {
        /// The chunk.
        index: u32,
        /// Hash sent with the chunk.
        declared: String,
        /// Hash of the bytes received.
        actual: String,
    },
    /// All chunks arrived but the whole file does not hash to the manifest's SHA-256.
    #[error("whole-file SHA-256 mismatch (manifest {declared}, reassembled file {actual}); every chunk must be sent again")]
    FileHash {
        /// The manifest's hash.
        declared: String,
        /// The hash of the reassembled file.
        actual: String,
    },
    /// The upload is not known (never started, finished, aborted or collected).
    #[error("no upload `{0}` in progress")]
    UnknownUpload(String),
    /// The same file id was started with a different manifest.
    #[error("upload `{0}` is already in progress with a different manifest")]
    ManifestConflict(String),
    /// `finish` before every chunk arrived.
    #[error("upload `{file_id}` is missing {missing} of {count} chunks")]
    Incomplete {
        /// The upload.
        file_id: String,
        /// Chunks not received yet.
        missing: u32,
        /// Chunks in the file.
        count: u32,
    },
}

/// A failure of the chunker: the input was refused, or the disk failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The sender's input was refused; nothing was stored for it.
    #[error("{0}")]
    Rejected(#[from] Rejection),
    /// A file could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A persisted upload state could not be read.
    #[error("{}: unreadable upload state: {reason}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl ChunkError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        ChunkError::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// The rejection, when the input (not the disk) was at fault.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            ChunkError::Rejected(r) => Some(r),
            _ => None,
        }
    }
}
