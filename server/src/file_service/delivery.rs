//! Delivery tracking: a verified file's completion went to some sinks; the file stays in
//! the spool until every one of them has written it (`delivery.json` beside it), and once
//! delivered a note under `delivered/{agent}/{file_id}` remembers it for `files.remember`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The delivery record's name in an upload's spool directory.
pub(super) const DELIVERY_FILE: &str = "delivery.json";

/// A verified file whose completion message went to sinks that may not have written it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Delivery {
    #[serde(skip)]
    pub(super) agent: String,
    #[serde(skip)]
    pub(super) file_id: String,
    pub(super) index: u64,
    pub(super) sinks: Vec<String>,
    /// Where each sink puts the file (told to the agent).
    #[serde(default)]
    pub(super) landed: Vec<String>,
}

/// Writes `value` as JSON to `path` (creating its directory), via a temporary file and a
/// rename so it is never half written.
pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    fleetbus_sinks::write_atomically(path, &bytes).map_err(std::io::Error::other)
}

/// Deletes delivery notes older than `age` under `dir/{agent}/`.
pub(super) fn forget_older_than(dir: &Path, age: Duration) {
    let Ok(agents) = std::fs::read_dir(dir) else {
        return;
    };
    for agent in agents.flatten() {
        let Ok(notes) = std::fs::read_dir(agent.path()) else {
            continue;
        };
        for note in notes.flatten() {
            let old = note
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|e| e >= age);
            if old {
                let _ = std::fs::remove_file(note.path());
            }
        }
    }
}
