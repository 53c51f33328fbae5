//! Errors of the segmented log.

use std::path::{Path, PathBuf};

/// Everything that can go wrong with a log, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum SegLogError {
    /// An I/O operation on a log file failed (disk full, permissions, ...).
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record is larger than the log accepts.
    #[error("record of {len} bytes exceeds the log's limit of {max} bytes")]
    RecordTooLarge {
        /// The record's size.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// A file is not a log segment, or its contents are inconsistent.
    #[error("{}: corrupt at byte {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

impl SegLogError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        SegLogError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
