//! Small state files in `state_dir` (upload jobs and outcomes, job records), written so a
//! crash leaves either the old or the new content, never a torn file.

use std::path::Path;

use serde::Serialize;

use crate::AgentError;

/// Writes `value` as JSON via a temporary file (forced to disk) and a rename.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AgentError::State {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| AgentError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        })
}
