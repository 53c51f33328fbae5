//! Small state files in `state_dir` (upload jobs and outcomes, job records, the enrolled
//! credential), written so a crash leaves either the old or the new content, never a torn
//! file.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::AgentError;

/// Writes `value` as JSON via a temporary file (forced to disk) and a rename.
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
    let tmp = path.with_extension("json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    options
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| AgentError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        })
}
