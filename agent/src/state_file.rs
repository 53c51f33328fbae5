//! Small state files in `state_dir` (upload jobs and outcomes, job records, the enrolled
//! credential), written so a crash or a power loss leaves either the old or the new
//! content, never a torn file ([`fleetbus_support::durable`]).

use std::path::Path;

use serde::Serialize;

use crate::AgentError;

/// Writes `value` as JSON via a temporary file (forced to disk), a rename and a directory
/// fsync.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    write(path, value, false)
}

/// [`write_json`] for a secret: the file is readable by its owner only.
pub(crate) fn write_secret_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    write(path, value, true)
}

fn write<T: Serialize>(path: &Path, value: &T, secret: bool) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AgentError::State {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let mode = secret.then_some(0o600);
    fleetbus_support::durable::replace_file_with_mode(path, &bytes, mode).map_err(|source| {
        AgentError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        }
    })
}
