//! Credentials: who may connect to the embedded broker, and as what.
//!
//! One SQLite file (`{data_dir}/credentials.db`) holds, per client id, its role, its groups,
//! the SHA-256 of its secret token (the token itself is shown once, at enrollment, and never
//! stored) and whether it is revoked. `fleetbus agents enroll/revoke` write it (with or
//! without a running server); the server reads it into a [`Credentials`] snapshot and
//! reloads that whenever another process commits a change (see
//! [`CredentialStore::changed`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::acl::{Identity, Role, RESERVED_IDS};

/// File name of the store inside the server's data directory.
pub const CREDENTIALS_FILE: &str = "credentials.db";

/// Bytes of randomness in a token (printed as hex).
const TOKEN_BYTES: usize = 32;

/// Errors reading or changing the credential store.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The database cannot be opened or used.
    #[error("credential store {path}: {reason}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// SQLite's explanation.
        reason: String,
    },
    /// The id or a group name cannot be used.
    #[error("{0}")]
    InvalidName(String),
    /// Enrolling an id that already has a live credential.
    #[error("`{0}` is already enrolled (use --replace to issue a new token, which invalidates the old one)")]
    Exists(String),
    /// Enrolling an id whose credential was revoked (without `--replace`).
    #[error(
        "`{0}` was revoked: it stays revoked until an operator enrolls it again with --replace"
    )]
    Revoked(String),
    /// Revoking or looking up an id that was never enrolled.
    #[error("`{0}` is not enrolled")]
    Unknown(String),
}

/// One enrolled client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Client id (the agent id for agents).
    pub id: String,
    /// What it may do (see [`crate::acl::Policy`]).
    pub role: Role,
    /// Its groups (agents: which group job topics it may subscribe to).
    pub groups: Vec<String>,
    /// SHA-256 of its token.
    pub token_sha256: [u8; 32],
    /// When it was (last) enrolled.
    pub enrolled_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Credential {
    /// The identity a connection authenticated with this credential has.
    pub fn identity(&self) -> Identity {
        Identity {
            client_id: self.id.clone(),
            role: self.role,
            groups: self.groups.clone(),
        }
    }
}

/// Why a CONNECT was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No password (token) in the CONNECT.
    NoToken,
    /// The user name is set and differs from the client id.
    UserMismatch,
    /// The token does not match the client id's credential.
    WrongToken,
    /// No credential for this client id.
    Unknown,
    /// The credential was revoked.
    Revoked,
    /// A bootstrap login for a client id that is already enrolled.
    IdTaken,
}

/// A successful login: the credential that was checked, and who the connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated<'a> {
    /// The credential the token belongs to (a bootstrap credential for an enrollment).
    pub credential: &'a Credential,
    /// The connection's identity: its client id, role and groups.
    pub identity: Identity,
}

impl AuthFailure {
    /// In words, for events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::NoToken => "no token (MQTT password) given",
            AuthFailure::UserMismatch => "user name differs from the client id",
            AuthFailure::WrongToken => "wrong token",
            AuthFailure::Unknown => "unknown client id (not enrolled)",
            AuthFailure::Revoked => "credential revoked",
            AuthFailure::IdTaken => "bootstrap login for a client id that is already enrolled",
        }
    }
}

/// A snapshot of every credential, for the broker's CONNECT checks.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_id: HashMap<String, Credential>,
}

impl Credentials {
    /// Checks a CONNECT's client id, user name and password (the token). The user name is
    /// the client id (or empty), except for an enrollment: then it names a bootstrap
    /// credential and the client id is the agent id wanted, which must not be enrolled.
    pub fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        token: Option<&[u8]>,
    ) -> Result<Authenticated<'_>, AuthFailure> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::NoToken)?;
        let bootstrap = username.filter(|u| !u.is_empty() && *u != client_id);
        let credential = match bootstrap {
            Some(user) => match self.by_id.get(user) {
                Some(c) if c.role == Role::Bootstrap => c,
                _ => return Err(AuthFailure::UserMismatch),
            },
            None => self.by_id.get(client_id).ok_or(AuthFailure::Unknown)?,
        };
        if credential.revoked_at.is_some() {
            return Err(AuthFailure::Revoked);
        }
        let offered: [u8; 32] = Sha256::digest(token).into();
        // compare without an early exit
        let difference = offered
            .iter()
            .zip(credential.token_sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference != 0 {
            return Err(AuthFailure::WrongToken);
        }
        let mut identity = credential.identity();
        if bootstrap.is_some() {
            // a revoked id stays revoked: only an operator enrolls it again (--replace)
            match self.by_id.get(client_id) {
                Some(c) if c.revoked_at.is_some() => return Err(AuthFailure::Revoked),
                Some(_) => return Err(AuthFailure::IdTaken),
                None => {}
            }
            identity.client_id = client_id.to_string();
        }
        Ok(Authenticated {
            credential,
            identity,
        })
    }

    /// The credential of `id`, revoked or not.
    pub fn get(&self, id: &str) -> Option<&Credential> {
        self.by_id.get(id)
    }

    /// Whether a connection authenticated as `credential` must be dropped under this
    /// snapshot (revoked, removed or re-enrolled with a new token since).
    pub fn invalidates(&self, credential: &Credential) -> bool {
        match self.by_id.get(&credential.id) {
            Some(now) => now.revoked_at.is_some() || now.token_sha256 != credential.token_sha256,
            None => true,
        }
    }

    /// Number of credentials (revoked included).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when nothing is enrolled.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The SQLite file behind the credentials.
pub struct CredentialStore {
    conn: Connection,
    path: PathBuf,
}

impl CredentialStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open_in(data_dir: &Path) -> Result<CredentialStore, CredentialError> {
        CredentialStore::open(&data_dir.join(CREDENTIALS_FILE))
    }

    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<CredentialStore, CredentialError> {
        let store_err = |e: rusqlite::Error| CredentialError::Store {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| CredentialError::Store {
                path: path.to_path_buf(),
                reason: format!("cannot create {}: {e}", parent.display()),
            })?;
        }
        let conn = Connection::open(path).map_err(store_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(store_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS credentials (
                 id TEXT PRIMARY KEY,
                 role TEXT NOT NULL,
                 groups TEXT NOT NULL,
                 token_sha256 BLOB NOT NULL,
                 enrolled_at TEXT NOT NULL,
                 revoked_at TEXT
             );
             CREATE INDEX IF NOT EXISTS credentials_by_token ON credentials (token_sha256);",
        )
        .map_err(store_err)?;
        Ok(CredentialStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> CredentialError {
        CredentialError::Store {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Enrolls `id` with `role` and `groups` and returns its new token (shown once: only
    /// its hash is kept). An id that has a credential, live or revoked, is refused unless
    /// `replace`, which issues a new token (the old one stops working): a revoked id stays
    /// revoked until an operator enrolls it again on purpose.
    pub fn enroll(
        &self,
        id: &str,
        role: Role,
        groups: &[String],
        replace: bool,
    ) -> Result<String, CredentialError> {
        check_name("client id", id)?;
        for group in groups {
            check_name("group", group)?;
        }
        if let Some(existing) = self.get(id)? {
            match (existing.revoked_at, replace) {
                (_, true) => {}
                (None, false) => return Err(CredentialError::Exists(id.to_string())),
                (Some(_), false) => return Err(CredentialError::Revoked(id.to_string())),
            }
        }
        let mut secret = [0u8; TOKEN_BYTES];
        rand::rng().fill_bytes(&mut secret);
        let token = hex::encode(secret);
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO credentials (id, role, groups, token_sha256, enrolled_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                params![
                    id,
                    role.as_str(),
                    groups.join(","),
                    &hash[..],
                    Utc::now().to_rfc3339()
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(token)
    }

    /// Revokes `id`: its next CONNECT is refused and a running server drops its live
    /// connection. Revoking twice keeps the first time.
    pub fn revoke(&self, id: &str) -> Result<(), CredentialError> {
        let changed = self
            .conn
            .execute(
                "UPDATE credentials SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, Utc::now().to_rfc3339()],
            )
            .map_err(|e| self.err(e))?;
        match changed {
            0 => Err(CredentialError::Unknown(id.to_string())),
            _ => Ok(()),
        }
    }

    /// The credential of `id`, if enrolled.
    pub fn get(&self, id: &str) -> Result<Option<Credential>, CredentialError> {
        self.one_where("id = ?1", params![id])
    }

    /// The credential `token` belongs to, if any (revoked or not: the caller decides).
    pub fn find_by_token(&self, token: &str) -> Result<Option<Credential>, CredentialError> {
        let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        self.one_where("token_sha256 = ?1", params![&hash[..]])
    }

    /// The credential selected by SQL condition `condition` with `params`, if any.
    fn one_where(
        &self,
        condition: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Option<Credential>, CredentialError> {
        let sql = format!(
            "SELECT id, role, groups, token_sha256, enrolled_at, revoked_at FROM credentials WHERE {condition}"
        );
        self.conn
            .query_row(&sql, params, row_to_credential)
            .optional()
            .map_err(|e| self.err(e))?
            .transpose()
            .map_err(|reason| CredentialError::Store {
                path: self.path.clone(),
                reason,
            })
    }

    /// Every credential, by id.
    pub fn list(&self) -> Result<Vec<Credential>, CredentialError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, role, groups, token_sha256, enrolled_at, revoked_at FROM credentials ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], row_to_credential)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let credential =
                row.map_err(|e| self.err(e))?
                    .map_err(|reason| CredentialError::Store {
                        path: self.path.clone(),
                        reason,
                    })?;
            out.push(credential);
        }
        Ok(out)
    }

    /// Every credential, as the broker's lookup table.
    pub fn snapshot(&self) -> Result<Credentials, CredentialError> {
        Ok(Credentials {
            by_id: self
                .list()?
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
        })
    }

    /// A number that changes whenever another connection (another process: the CLI)
    /// commits a change; the server polls it and reloads its snapshot when it moves.
    pub fn changed(&self) -> Result<i64, CredentialError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }
}

type Row = Result<Credential, String>;

fn row_to_credential(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let id: String = row.get(0)?;
    let role: String = row.get(1)?;
    let groups: String = row.get(2)?;
    let hash: Vec<u8> = row.get(3)?;
    let enrolled_at: String = row.get(4)?;
    let revoked_at: Option<String> = row.get(5)?;
    Ok((|| {
        let role = Role::parse(&role).ok_or_else(|| format!("`{id}`: unknown role `{role}`"))?;
        let token_sha256: [u8; 32] = hash
            .try_into()
            .map_err(|_| format!("`{id}`: token hash is not 32 bytes"))?;
        let time = |t: &str| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("`{id}`: bad time `{t}`: {e}"))
        };
        Ok(Credential {
            groups: groups
                .split(',')
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect(),
            role,
            token_sha256,
            enrolled_at: time(&enrolled_at)?,
            revoked_at: revoked_at.as_deref().map(time).transpose()?,
            id,
        })
    })())
}

fn check_name(what: &'static str, name: &str) -> Result<(), CredentialError> {
    fleetbus_protocol::validate_id(what, name)
        .map_err(|e| CredentialError::InvalidName(e.to_string()))?;
    if RESERVED_IDS.contains(&name) {
        return Err(CredentialError::InvalidName(format!(
            "{what} `{name}` is reserved (it names a topic branch of its own)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_authenticate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        let token = store
            .enroll("web-01", Role::Agent, &["web".into(), "eu".into()], false)
            .unwrap();
        assert_eq!(token.len(), 64);
        let snap = store.snapshot().unwrap();
        let c = snap
            .authenticate("web-01", None, Some(token.as_bytes()))
            .unwrap();
        assert_eq!(c.identity.groups, vec!["web", "eu"]);
        assert_eq!(
            snap.authenticate("web-01", None, Some(b"nope")).err(),
            Some(AuthFailure::WrongToken)
        );
        assert_eq!(
            snap.authenticate("web-01", None, None).err(),
            Some(AuthFailure::NoToken)
        );
        assert_eq!(
            snap.authenticate("web-01", Some("web-02"), Some(token.as_bytes()))
                .err(),
            Some(AuthFailure::UserMismatch)
        );
        assert_eq!(
            snap.authenticate("web-02", None, Some(token.as_bytes()))
                .err(),
            Some(AuthFailure::Unknown)
        );
        // enrolling again needs --replace, which invalidates the old token
        assert!(matches!(
            store.enroll("web-01", Role::Agent, &[], false),
            Err(CredentialError::Exists(_))
        ));
        let old = snap.get("web-01").unwrap().clone();
        let token2 = store.enroll("web-01", Role::Agent, &[], true).unwrap();
        let snap2 = store.snapshot().unwrap();
        assert!(snap2.invalidates(&old));
        assert_eq!(
            snap2
                .authenticate("web-01", None, Some(token.as_bytes()))
                .err(),
            Some(AuthFailure::WrongToken)
        );
        store.revoke("web-01").unwrap();
        let snap3 = store.snapshot().unwrap();
        assert_eq!(
            snap3
                .authenticate("web-01", None, Some(token2.as_bytes()))
                .err(),
            Some(AuthFailure::Revoked)
        );
        assert!(matches!(
            store.revoke("nobody"),
            Err(CredentialError::Unknown(_))
        ));
    }

    #[test]
    fn a_bootstrap_token_logs_in_only_for_new_ids_and_as_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        let boot = store
            .enroll("provision", Role::Bootstrap, &["edge".into()], false)
            .unwrap();
        store.enroll("taken", Role::Agent, &[], false).unwrap();
        let snap = store.snapshot().unwrap();
        let login = snap
            .authenticate("new-1", Some("provision"), Some(boot.as_bytes()))
            .unwrap();
        assert_eq!(login.credential.id, "provision");
        assert_eq!(
            login.identity,
            Identity {
                client_id: "new-1".into(),
                role: Role::Bootstrap,
                groups: vec!["edge".into()],
            }
        );
        assert_eq!(
            snap.authenticate("taken", Some("provision"), Some(boot.as_bytes()))
                .err(),
            Some(AuthFailure::IdTaken)
        );
        assert_eq!(
            snap.authenticate("new-1", Some("provision"), Some(b"x"))
                .err(),
            Some(AuthFailure::WrongToken)
        );
        // an agent's own token does not open other ids
        let agent = store.enroll("agent-1", Role::Agent, &[], false).unwrap();
        let snap = store.snapshot().unwrap();
        assert_eq!(
            snap.authenticate("new-2", Some("agent-1"), Some(agent.as_bytes()))
                .err(),
            Some(AuthFailure::UserMismatch)
        );
    }

    #[test]
    fn a_revoked_id_stays_revoked_until_an_operator_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        let boot = store
            .enroll("provision", Role::Bootstrap, &["edge".into()], false)
            .unwrap();
        store.enroll("stolen", Role::Agent, &[], false).unwrap();
        store.revoke("stolen").unwrap();
        let snap = store.snapshot().unwrap();
        // a bootstrap token cannot log in as it to re-enroll it...
        assert_eq!(
            snap.authenticate("stolen", Some("provision"), Some(boot.as_bytes()))
                .err(),
            Some(AuthFailure::Revoked)
        );
        // ...and enrolling it (what the enrollment service does) is refused
        assert!(matches!(
            store.enroll("stolen", Role::Agent, &["edge".into()], false),
            Err(CredentialError::Revoked(_))
        ));
        assert!(snap.get("stolen").unwrap().revoked_at.is_some());
        // an operator's --replace enrolls it again
        let token = store.enroll("stolen", Role::Agent, &[], true).unwrap();
        let snap = store.snapshot().unwrap();
        assert!(snap
            .authenticate("stolen", None, Some(token.as_bytes()))
            .is_ok());
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        for id in ["", "a/b", "groups", "server", "x+y", "#"] {
            assert!(
                matches!(
                    store.enroll(id, Role::Agent, &[], false),
                    Err(CredentialError::InvalidName(_))
                ),
                "{id}"
            );
        }
        assert!(matches!(
            store.enroll("ok", Role::Agent, &["bad/group".into()], false),
            Err(CredentialError::InvalidName(_))
        ));
    }

    #[test]
    fn another_process_changing_the_store_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let server = CredentialStore::open_in(dir.path()).unwrap();
        let before = server.changed().unwrap();
        let cli = CredentialStore::open_in(dir.path()).unwrap();
        cli.enroll("a1", Role::Agent, &[], false).unwrap();
        assert_ne!(server.changed().unwrap(), before);
        assert!(server.snapshot().unwrap().get("a1").is_some());
    }
}
