//! File completions as sinks see them: the message the server's file service publishes on
//! `fleet/{agent}/files/{file_id}/complete` once a file is verified, and where its bytes
//! are (the spool, under the server's data directory: its layout is the chunker's,
//! [`fleetbus_chunker::spool`]).

use std::path::{Path, PathBuf};

use fleetbus_protocol::files::{parse_file_rest, FileAction};
use fleetbus_protocol::{FileCompleted, Message, Topic};

use crate::SinkError;

/// A verified file a sink is asked to store.
#[derive(Debug, Clone)]
pub struct CompletedFile {
    /// The completion message's content.
    pub completed: FileCompleted,
    /// The verified bytes.
    pub path: PathBuf,
}

/// True when `msg` is a file completion (by its topic).
pub fn is_completion(msg: &Message) -> bool {
    match Topic::parse(&msg.topic) {
        Topic::Files { rest, .. } => {
            matches!(parse_file_rest(rest), Some((_, FileAction::Complete)))
        }
        _ => false,
    }
}

/// The completed file `msg` announces, with its spool path under `data_dir`; `None` when
/// `msg` is not a completion. A completion whose spool path would leave the spool
/// directory, or whose file is gone, is an error naming it.
pub fn completed_file(data_dir: &Path, msg: &Message) -> Option<Result<CompletedFile, SinkError>> {
    if !is_completion(msg) {
        return None;
    }
    Some(resolve(data_dir, msg))
}

fn resolve(data_dir: &Path, msg: &Message) -> Result<CompletedFile, SinkError> {
    let completed: FileCompleted = serde_json::from_value(msg.body.clone()).map_err(|e| {
        SinkError::Encode(format!("{}: not a file completion message: {e}", msg.topic))
    })?;
    let spool = fleetbus_chunker::spool::spool_dir(data_dir);
    let Some(path) = fleetbus_chunker::spool::resolve(&spool, &completed.spool) else {
        return Err(SinkError::Encode(format!(
            "{}: spool path `{}` is not inside the spool directory",
            msg.topic, completed.spool
        )));
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == completed.file.size => Ok(CompletedFile { completed, path }),
        Ok(m) => Err(SinkError::Encode(format!(
            "{}: spool file has {} bytes, the completion says {}",
            path.display(),
            m.len(),
            completed.file.size
        ))),
        Err(e) => Err(SinkError::io(path, crate::COMPLETED_FILE_OP, e)),
    }
}
