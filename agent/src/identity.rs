//! The agent's identity: a stable id that never depends on hostname or IP address.

use std::fs;
use std::path::Path;

use fleetbus_protocol::validate_id;

use crate::AgentError;

/// Name of the file in `state_dir` holding the generated id.
pub const ID_FILE: &str = "agent-id";

/// Returns the agent id: `configured` when set, else the id stored in `state_dir`, else a
/// new random id (UUID v4) which is stored there for every later start. Cloned machines
/// share a stored id; `fleetbus agents reset-identity` (deleting the file) separates them.
pub fn resolve(configured: Option<&str>, state_dir: &Path) -> Result<String, AgentError> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = state_dir.join(ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_string();
            validate_id("stored agent id", &id).map_err(|e| AgentError::State {
                path: path.clone(),
                problem: e.to_string(),
            })?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            let tmp = state_dir.join(format!("{ID_FILE}.tmp"));
            fs::write(&tmp, format!("{id}\n"))
                .and_then(|_| fs::File::open(&tmp)?.sync_all())
                .and_then(|_| fs::rename(&tmp, &path))
                .map_err(|source| AgentError::Io {
                    path: path.clone(),
                    op: "write agent id",
                    source,
                })?;
            tracing::info!(agent = %id, file = %path.display(), "generated a new agent id");
            Ok(id)
        }
        Err(source) => Err(AgentError::Io {
            path,
            op: "read agent id",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_is_kept_and_config_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = resolve(None, dir.path()).unwrap();
        let b = resolve(None, dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(resolve(Some("web-01"), dir.path()).unwrap(), "web-01");
        assert_eq!(resolve(None, dir.path()).unwrap(), a);
    }

    #[test]
    fn corrupt_id_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ID_FILE), "bad id/with slash").unwrap();
        let err = resolve(None, dir.path()).unwrap_err().to_string();
        assert!(err.contains(ID_FILE), "{err}");
    }
}
