//! Secrets a sink needs (a database password, a webhook's token) named in the rules file by
//! where they are, never by value: an environment variable of the server or a file. They
//! are read when the rules are checked (so a missing one is reported with the file's other
//! problems) and when the sink is built.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a secret is: `{ env = "NAME" }` or `{ file = "/path" }` (its content trimmed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Secret {
    /// An environment variable of the server.
    Env {
        /// Its name.
        env: String,
    },
    /// A file's content, trimmed of surrounding whitespace.
    File {
        /// Its path.
        file: PathBuf,
    },
}

impl Secret {
    /// The value, read now; the error names the variable or file.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            Secret::Env { env } => {
                std::env::var(env).map_err(|_| format!("environment variable {env} is not set"))
            }
            Secret::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("{}: {e}", file.display())),
        }
    }
}
