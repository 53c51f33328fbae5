//! The agent registry: every agent the server knows from its presence messages, with its
//! groups, whether it is online and when it was last heard of. It has its own SQLite file
//! (`data_dir/agents.sqlite`), apart from the job ledger, so `fleetbus agents list` and
//! `agents forget` work on a server that pushes no jobs (no `jobs.signing_key`).

use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::JobsError;

/// An agent the server knows from its presence messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownAgent {
    /// Its id.
    pub agent: String,
    /// Groups from its last birth message.
    pub groups: Vec<String>,
    /// Whether its last presence message said online.
    pub online: bool,
    /// When its last presence message arrived.
    pub last_seen: Option<DateTime<Utc>>,
}

impl KnownAgent {
    /// Whether the agent said it belongs to `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// The SQLite-backed registry.
pub struct Registry {
    db: Connection,
}

impl Registry {
    /// Opens (creating) the registry at `path`.
    pub fn open(path: &Path) -> Result<Registry, JobsError> {
        let db = crate::ledger::open_db(
            path,
            "CREATE TABLE IF NOT EXISTS agents (
                 agent TEXT PRIMARY KEY, groups TEXT NOT NULL, online INTEGER NOT NULL,
                 last_seen_ms INTEGER NOT NULL);",
        )?;
        Ok(Registry { db })
    }

    /// Starts a transaction grouping the writes until [`Registry::commit`].
    pub fn begin(&mut self) -> Result<(), JobsError> {
        crate::ledger::begin(&self.db)
    }

    /// Commits the transaction [`Registry::begin`] started (rolls back if that fails).
    pub fn commit(&mut self) -> Result<(), JobsError> {
        crate::ledger::commit_or_roll_back(&self.db)
    }

    /// Remembers an agent's groups (from its birth message) and whether it is online. A
    /// last-will message from an agent the registry does not know (forgotten) adds nothing.
    pub fn upsert(
        &mut self,
        agent: &str,
        groups: &[String],
        online: bool,
        at: DateTime<Utc>,
    ) -> Result<(), JobsError> {
        if online {
            self.db
                .prepare_cached(
                    "INSERT INTO agents (agent, groups, online, last_seen_ms) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT(agent) DO UPDATE SET groups = ?2, online = 1, last_seen_ms = ?3",
                )?
                .execute(params![agent, serde_json::to_string(groups)?, at.timestamp_millis()])?;
        } else {
            self.db
                .prepare_cached("UPDATE agents SET online = 0, last_seen_ms = ?2 WHERE agent = ?1")?
                .execute(params![agent, at.timestamp_millis()])?;
        }
        Ok(())
    }

    /// Forgets an agent. False when it was not known.
    pub fn forget(&mut self, agent: &str) -> Result<bool, JobsError> {
        let n = self
            .db
            .execute("DELETE FROM agents WHERE agent = ?1", params![agent])?;
        Ok(n > 0)
    }

    /// One agent, if known.
    pub fn get(&self, agent: &str) -> Result<Option<KnownAgent>, JobsError> {
        Ok(self.all()?.into_iter().find(|a| a.agent == agent))
    }

    /// Whether any agent is known.
    pub fn is_empty(&self) -> Result<bool, JobsError> {
        let n: i64 = self
            .db
            .query_row("SELECT COUNT(*) FROM agents", [], |r| r.get(0))?;
        Ok(n == 0)
    }

    /// Every known agent with its groups, by id.
    pub fn all(&self) -> Result<Vec<KnownAgent>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT agent, groups, online, last_seen_ms FROM agents ORDER BY agent",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(agent, groups, online, seen)| {
                Ok(KnownAgent {
                    agent,
                    groups: serde_json::from_str(&groups)?,
                    online,
                    last_seen: Utc.timestamp_millis_opt(seen).single(),
                })
            })
            .collect()
    }

    /// Members of `group` known from birth messages.
    pub fn members(&self, group: &str) -> Result<Vec<String>, JobsError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|a| a.in_group(group))
            .map(|a| a.agent)
            .collect())
    }

    /// Adds agents as they were (a one-time import from an older ledger).
    pub fn import(&mut self, agents: &[KnownAgent]) -> Result<(), JobsError> {
        let tx = self.db.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO agents (agent, groups, online, last_seen_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for a in agents {
                stmt.execute(params![
                    a.agent,
                    serde_json::to_string(&a.groups)?,
                    a.online,
                    a.last_seen.map(|t| t.timestamp_millis()).unwrap_or(0)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
