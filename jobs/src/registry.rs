//! The agent registry: every agent the server knows from its presence messages, with its
//! groups, whether it is online and when it was last heard of, and what its last birth
//! message said (host, version, tags, cloud identity). It has its own SQLite file
//! (`data_dir/agents.sqlite`), apart from the job ledger, so `fleetbus agents list` and
//! `agents forget` work on a server that pushes no jobs (no `jobs.signing_key`).
//!
//! It also keeps, per hour, which agents were online in it (with their groups and role
//! then), so that "how many web servers did we run last week" has an answer
//! ([`Registry::hours`]). An agent counts in an hour when a birth message of it arrived in
//! it or it was online when the hour began; rows older than [`HOURS_KEPT`] go.

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
    /// What its last birth message said about it.
    #[serde(default)]
    pub birth: Option<Birth>,
}

/// What a birth message says about an agent besides its groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Birth {
    /// Host name (informational).
    #[serde(default)]
    pub hostname: Option<String>,
    /// IP addresses (informational).
    #[serde(default)]
    pub ips: Vec<String>,
    /// Operating system.
    #[serde(default)]
    pub os: Option<String>,
    /// Agent version.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// Operator tags.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// Cloud identity.
    #[serde(default)]
    pub cloud: Option<fleetbus_protocol::CloudIdentity>,
}

impl Birth {
    /// What `presence` says.
    pub fn of(presence: &fleetbus_protocol::Presence) -> Birth {
        Birth {
            hostname: presence.hostname.clone(),
            ips: presence.ips.clone(),
            os: presence.os.clone(),
            agent_version: presence.agent_version.clone(),
            tags: presence.tags.clone(),
            cloud: presence.cloud.clone(),
        }
    }
}

/// How many agents were online in one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourCount {
    /// The hour's start.
    pub hour: DateTime<Utc>,
    /// Distinct agents online in it (of the group or role asked for).
    pub agents: u64,
}

/// How long the hourly counts are kept: a row per agent and hour (10,000 agents: 8.4 million
/// rows, about 500 MB), enough for last week and last month.
pub const HOURS_KEPT: chrono::Duration = chrono::Duration::days(35);

/// The start of the hour `at` is in, in milliseconds.
fn hour_of(at: DateTime<Utc>) -> i64 {
    let ms = at.timestamp_millis();
    ms - ms.rem_euclid(3_600_000)
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
    /// The hour whose online agents were last noted ([`Registry::note_hour`]).
    noted_hour: Option<i64>,
}

impl Registry {
    /// Opens (creating) the registry at `path`.
    pub fn open(path: &Path) -> Result<Registry, JobsError> {
        let db = crate::ledger::open_db(
            path,
            "CREATE TABLE IF NOT EXISTS agents (
                 agent TEXT PRIMARY KEY, groups TEXT NOT NULL, online INTEGER NOT NULL,
                 last_seen_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS agent_hours (
                 hour_ms INTEGER NOT NULL, agent TEXT NOT NULL, groups TEXT NOT NULL,
                 role TEXT, PRIMARY KEY (hour_ms, agent));",
        )?;
        // the birth column came later: added to a registry made before it
        let has_birth = db
            .prepare("SELECT 1 FROM pragma_table_info('agents') WHERE name = 'birth'")?
            .exists([])?;
        if !has_birth {
            db.execute_batch("ALTER TABLE agents ADD COLUMN birth TEXT")?;
        }
        Ok(Registry {
            db,
            noted_hour: None,
        })
    }

    /// Starts a transaction grouping the writes until [`Registry::commit`].
    pub fn begin(&mut self) -> Result<(), JobsError> {
        crate::ledger::begin(&self.db)
    }

    /// Commits the transaction [`Registry::begin`] started (rolls back if that fails).
    pub fn commit(&mut self) -> Result<(), JobsError> {
        crate::ledger::commit_or_roll_back(&self.db)
    }

    /// Remembers an agent's groups and what else its birth message says (`birth`), and
    /// whether it is online; an agent online counts in the hour of `at`. A last-will
    /// message from an agent the registry does not know (forgotten) adds nothing.
    pub fn upsert(
        &mut self,
        agent: &str,
        groups: &[String],
        online: bool,
        at: DateTime<Utc>,
        birth: Option<&Birth>,
    ) -> Result<(), JobsError> {
        if online {
            let groups = serde_json::to_string(groups)?;
            let birth_json = birth.map(serde_json::to_string).transpose()?;
            self.db
                .prepare_cached(
                    "INSERT INTO agents (agent, groups, online, last_seen_ms, birth) VALUES (?1, ?2, 1, ?3, ?4)
                     ON CONFLICT(agent) DO UPDATE SET groups = ?2, online = 1, last_seen_ms = ?3,
                     birth = coalesce(?4, birth)",
                )?
                .execute(params![agent, groups, at.timestamp_millis(), birth_json])?;
            let role = birth
                .and_then(|b| b.cloud.as_ref())
                .and_then(|c| c.role.clone());
            self.db
                .prepare_cached(
                    "INSERT INTO agent_hours (hour_ms, agent, groups, role) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (hour_ms, agent) DO UPDATE SET groups = ?3, role = coalesce(?4, role)",
                )?
                .execute(params![hour_of(at), agent, groups, role])?;
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
            "SELECT agent, groups, online, last_seen_ms, birth FROM agents ORDER BY agent",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(agent, groups, online, seen, birth)| {
                Ok(KnownAgent {
                    agent,
                    groups: serde_json::from_str(&groups)?,
                    online,
                    last_seen: Utc.timestamp_millis_opt(seen).single(),
                    // written by the registry itself: unreadable only if hand-edited
                    birth: birth.and_then(|b| serde_json::from_str(&b).ok()),
                })
            })
            .collect()
    }

    /// Counts, in the hour `now` is in, every agent online now (once an hour: later calls
    /// in the same hour do nothing), and drops counts older than [`HOURS_KEPT`].
    pub fn note_hour(&mut self, now: DateTime<Utc>) -> Result<(), JobsError> {
        let hour = hour_of(now);
        if self.noted_hour == Some(hour) {
            return Ok(());
        }
        self.db.execute(
            "INSERT OR IGNORE INTO agent_hours (hour_ms, agent, groups, role)
             SELECT ?1, agent, groups, json_extract(birth, '$.cloud.role') FROM agents WHERE online = 1",
            params![hour],
        )?;
        self.db.execute(
            "DELETE FROM agent_hours WHERE hour_ms < ?1",
            params![hour_of(now - HOURS_KEPT)],
        )?;
        self.noted_hour = Some(hour);
        Ok(())
    }

    /// Agents online per hour since `since` (oldest first; hours with none left out), of
    /// `group` and of `role` when given.
    pub fn hours(
        &self,
        since: DateTime<Utc>,
        group: Option<&str>,
        role: Option<&str>,
    ) -> Result<Vec<HourCount>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT hour_ms, count(DISTINCT agent) FROM agent_hours
             WHERE hour_ms >= ?1
               AND (?2 IS NULL OR EXISTS (SELECT 1 FROM json_each(groups) WHERE value = ?2))
               AND (?3 IS NULL OR role = ?3)
             GROUP BY hour_ms ORDER BY hour_ms",
        )?;
        let rows = stmt
            .query_map(params![hour_of(since), group, role], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(hour, n)| {
                Some(HourCount {
                    hour: Utc.timestamp_millis_opt(hour).single()?,
                    agents: n.max(0) as u64,
                })
            })
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbus_protocol::CloudIdentity;

    fn birth(role: &str) -> Birth {
        Birth {
            hostname: Some("h".into()),
            cloud: Some(CloudIdentity {
                provider: "aws".into(),
                instance_id: format!("i-{role}"),
                role: Some(role.into()),
                ..CloudIdentity::default()
            }),
            ..Birth::default()
        }
    }

    fn at(h: i64, m: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + h * 3600 + m * 60, 0)
            .unwrap()
    }

    /// Two web servers and a database over three hours: each hour counts who was online
    /// in it, by role and by group, and a will keeps an agent out of the next hour.
    #[test]
    fn online_agents_are_counted_per_hour_by_role_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("agents.sqlite")).unwrap();
        let web = vec!["web".to_string()];
        r.upsert("w1", &web, true, at(0, 5), Some(&birth("web")))
            .unwrap();
        r.upsert("w2", &web, true, at(0, 50), Some(&birth("web")))
            .unwrap();
        r.upsert(
            "db1",
            &["db".to_string()],
            true,
            at(0, 1),
            Some(&birth("db")),
        )
        .unwrap();
        r.note_hour(at(1, 0)).unwrap();
        r.upsert("w2", &web, false, at(1, 30), None).unwrap();
        r.note_hour(at(2, 0)).unwrap();
        r.note_hour(at(2, 30)).unwrap(); // the same hour: nothing more
        let count = |group: Option<&str>, role: Option<&str>| -> Vec<u64> {
            r.hours(at(0, 0), group, role)
                .unwrap()
                .iter()
                .map(|h| h.agents)
                .collect()
        };
        assert_eq!(count(None, Some("web")), [2, 2, 1]);
        assert_eq!(count(Some("db"), None), [1, 1, 1]);
        assert_eq!(count(None, None), [3, 3, 2]);
        assert_eq!(r.hours(at(0, 0), None, None).unwrap()[1].hour, at(1, 0));
        // what the birth message said is kept, and a will does not erase it
        let w2 = r.get("w2").unwrap().unwrap();
        assert!(!w2.online);
        assert_eq!(
            w2.birth.unwrap().cloud.unwrap().role.as_deref(),
            Some("web")
        );
    }

    #[test]
    fn a_registry_from_before_the_birth_column_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.sqlite");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE agents (agent TEXT PRIMARY KEY, groups TEXT NOT NULL,
             online INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL);
             INSERT INTO agents VALUES ('a1', '[\"web\"]', 1, 0);",
        )
        .unwrap();
        drop(old);
        let r = Registry::open(&path).unwrap();
        let a1 = r.get("a1").unwrap().unwrap();
        assert_eq!((a1.groups, a1.birth), (vec!["web".to_string()], None));
    }
}
