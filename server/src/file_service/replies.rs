//! The file service's answers to agents (`fleet/{agent}/replies/files`): what a chunker
//! outcome or error tells the agent to do next.

use fleetbus_chunker::{ChunkError, Rejection};
use fleetbus_protocol::{ChunkOutcome, FileManifest, FileReply, RefusalKind};

/// A refusal of the whole upload: `kind` says what the agent does next.
pub(super) fn failed(file_id: &str, kind: RefusalKind, reason: String) -> FileReply {
    FileReply::Failed {
        file_id: file_id.to_string(),
        kind,
        reason,
    }
}

/// The answer about one chunk.
pub(super) fn chunk_reply(
    file_id: &str,
    index: u32,
    outcome: ChunkOutcome,
    reason: Option<String>,
) -> FileReply {
    FileReply::Chunk {
        file_id: file_id.to_string(),
        index,
        outcome,
        reason,
    }
}

/// The status of a file held complete (every chunk held).
pub(super) fn complete_status(m: &FileManifest) -> FileReply {
    FileReply::Status {
        file_id: m.file_id.clone(),
        chunk_count: m.chunk_count,
        held: if m.chunk_count > 0 {
            vec![(0, m.chunk_count - 1)]
        } else {
            Vec::new()
        },
        complete: true,
    }
}

/// The reply for a chunker error: what the agent should do about it.
pub(super) fn refusal(file_id: &str, e: ChunkError) -> FileReply {
    let kind = match &e {
        ChunkError::Rejected(r) => match r {
            Rejection::UnknownUpload { .. } => RefusalKind::UnknownUpload,
            Rejection::QuotaExceeded { .. } | Rejection::TooManyUploads { .. } => {
                RefusalKind::Quota
            }
            Rejection::Incomplete { .. } => RefusalKind::Incomplete,
            Rejection::FileHash { .. } => RefusalKind::FileHash,
            Rejection::IndexOutOfRange { .. }
            | Rejection::Offset { .. }
            | Rejection::Length { .. }
            | Rejection::ChunkHash { .. } => RefusalKind::BadChunk,
            Rejection::Manifest(_)
            | Rejection::Owner(_)
            | Rejection::TooLarge { .. }
            | Rejection::ManifestConflict(_) => RefusalKind::BadManifest,
        },
        ChunkError::Io { .. } | ChunkError::State { .. } => RefusalKind::Busy,
    };
    failed(file_id, kind, e.to_string())
}
