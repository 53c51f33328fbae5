//! The agent's identity: a stable id that never depends on hostname or IP address.

use std::fs;
use std::path::{Path, PathBuf};

use fleetbus_protocol::validate_id;

use crate::{AgentConfig, AgentError};

/// Name of the file in `state_dir` holding the generated id.
pub const ID_FILE: &str = "agent-id";

/// Returns the agent id: `configured` when set, else the id stored in `state_dir`, else a
/// new random id (UUID v4) which is stored there for every later start. Cloned machines
/// share a stored id; `fleetbus agent reset-identity` ([`reset`]) separates them.
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
            fleetbus_support::replace_file(&path, format!("{id}\n").as_bytes()).map_err(
                |source| AgentError::Io {
                    path: path.clone(),
                    op: "write agent id",
                    source,
                },
            )?;
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

/// What [`reset`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    /// The id the state directory held, if any.
    pub old_id: Option<String>,
    /// The new id.
    pub new_id: String,
    /// Where the old state directory (outbox, uploads, job records) was moved.
    pub kept_in: PathBuf,
}

/// Gives the agent configured by `config` a new identity: its state directory is renamed
/// to `{state_dir}.before-reset-{unix seconds}` (nothing in it is deleted: unsent records
/// stay there) and a fresh one with a new id is made. Refused while the agent runs (the
/// state directory is locked) and when the configuration fixes the id.
pub fn reset(config: &AgentConfig) -> Result<Reset, AgentError> {
    if let Some(id) = &config.id {
        return Err(AgentError::Config(format!(
            "the configuration fixes `id = \"{id}\"`: give this machine another id there instead"
        )));
    }
    let state_dir = &config.state_dir;
    let old_id = match fs::read_to_string(state_dir.join(ID_FILE)) {
        Ok(text) => Some(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(AgentError::Io {
                path: state_dir.join(ID_FILE),
                op: "read agent id",
                source,
            })
        }
    };
    if state_dir.exists() {
        let lock = crate::lock_state_dir(state_dir)?;
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut kept_in = state_dir.as_os_str().to_owned();
        kept_in.push(format!(".before-reset-{seconds}"));
        let kept_in = PathBuf::from(kept_in);
        fleetbus_support::durable::rename(state_dir, &kept_in).map_err(|source| {
            AgentError::Io {
                path: state_dir.clone(),
                op: "move aside",
                source,
            }
        })?;
        drop(lock);
        fleetbus_support::create_dir(state_dir).map_err(|source| AgentError::Io {
            path: state_dir.clone(),
            op: "create state directory",
            source,
        })?;
        let new_id = resolve(None, state_dir)?;
        return Ok(Reset {
            old_id,
            new_id,
            kept_in,
        });
    }
    Err(AgentError::Config(format!(
        "{}: no state directory, so no identity to reset (a first start makes a new id)",
        state_dir.display()
    )))
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

    #[test]
    fn reset_keeps_the_old_state_aside_and_makes_a_new_id() {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig {
            state_dir: dir.path().join("state"),
            ..AgentConfig::default()
        };
        assert!(reset(&config).is_err(), "nothing to reset yet");
        fs::create_dir_all(&config.state_dir).unwrap();
        let old = resolve(None, &config.state_dir).unwrap();
        fs::write(config.state_dir.join("unsent"), "records").unwrap();
        let r = reset(&config).unwrap();
        assert_eq!(r.old_id.as_deref(), Some(old.as_str()));
        assert_ne!(r.new_id, old);
        assert_eq!(resolve(None, &config.state_dir).unwrap(), r.new_id);
        assert_eq!(
            fs::read_to_string(r.kept_in.join("unsent")).unwrap(),
            "records"
        );
        // refused while the agent runs, and when the id is fixed
        let _running = crate::lock_state_dir(&config.state_dir).unwrap();
        assert!(matches!(reset(&config), Err(AgentError::Locked { .. })));
        let fixed = AgentConfig {
            id: Some("web-01".into()),
            ..config.clone()
        };
        assert!(matches!(reset(&fixed), Err(AgentError::Config(_))));
    }
}
