//! Passive results: a check result submitted by a script (`fleetbus agent submit`) instead
//! of run by the agent.
//!
//! A submission is a small JSON file written into `state_dir/checks/submitted/` (a
//! temporary file, fsync, rename: never read half-written), named by its time so that the
//! agent takes submissions in the order they were made. The running agent picks them up,
//! pushes their results to the outbox like every record (so a server outage loses
//! nothing), forces the outbox to disk, and only then deletes the file. Submitting works
//! whether or not the agent is running: a file waits for it.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use fleetbus_protocol::check::CheckState;
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// The most bytes of one submission file the agent reads (a bigger one is refused).
pub const MAX_SUBMISSION_BYTES: u64 = 1024 * 1024;
/// The most submissions taken in one pass (the rest wait for the next).
pub const MAX_PER_PASS: usize = 1000;

/// One submitted result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The check (a `[checks.NAME]` of the agent's configuration).
    pub check: String,
    /// The state, 0 OK to 3 UNKNOWN.
    pub status: CheckState,
    /// The output as a plugin prints it: text, `|` performance data, long text lines.
    #[serde(default)]
    pub output: String,
    /// When it was submitted (the result record's time).
    pub ts: DateTime<Utc>,
}

impl Submission {
    /// A submission made now.
    pub fn now(check: String, status: CheckState, output: String) -> Submission {
        Submission {
            check,
            status,
            output,
            ts: Utc::now(),
        }
    }
}

/// Where submissions wait in `state_dir`.
pub fn submitted_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("checks").join("submitted")
}

/// Writes `submission` for the agent of `state_dir` to take; the file's path.
pub fn submit(state_dir: &Path, submission: &Submission) -> Result<PathBuf, AgentError> {
    let dir = submitted_dir(state_dir);
    fleetbus_support::create_dir(&dir).map_err(|source| AgentError::Io {
        path: dir.clone(),
        op: "create",
        source,
    })?;
    let nanos = submission.ts.timestamp_nanos_opt().unwrap_or_default();
    let path = dir.join(format!("{nanos:020}-{:08x}.json", rand::random::<u32>()));
    crate::state_file::write_json(&path, submission)?;
    Ok(path)
}

/// The submissions waiting, oldest first, at most [`MAX_PER_PASS`]: each file's path and
/// its submission, or why it cannot be read.
pub(crate) fn waiting(state_dir: &Path) -> Vec<(PathBuf, Result<Submission, String>)> {
    let dir = submitted_dir(state_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths.truncate(MAX_PER_PASS);
    paths
        .into_iter()
        .map(|path| {
            let read = read(&path);
            (path, read)
        })
        .collect()
}

fn read(path: &Path) -> Result<Submission, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > MAX_SUBMISSION_BYTES {
        return Err(format!(
            "{size} bytes, more than a submission may have ({MAX_SUBMISSION_BYTES})"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_are_taken_in_the_order_they_were_made_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        for (n, s) in [(2, 1_800_000_002), (1, 1_800_000_001), (3, 1_800_000_003)] {
            submit(
                dir.path(),
                &Submission {
                    check: format!("c{n}"),
                    status: CheckState::Warning,
                    output: "x".into(),
                    ts: at(s),
                },
            )
            .unwrap();
        }
        std::fs::write(
            submitted_dir(dir.path()).join("99999999999999999999-bad.json"),
            "{",
        )
        .unwrap();
        let got = waiting(dir.path());
        let names: Vec<String> = got
            .iter()
            .map(|(_, s)| {
                s.as_ref()
                    .map(|s| s.check.clone())
                    .unwrap_or_else(|e| e.clone())
            })
            .collect();
        assert_eq!(names[..3], ["c1", "c2", "c3"]);
        assert!(names[3].contains("EOF"), "{}", names[3]);
    }
}
