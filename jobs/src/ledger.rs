//! The ledger: jobs, per-target executions and known agents in SQLite under the server's
//! data directory (`data_dir/jobs.sqlite`), so pending executions survive a restart and are
//! sent again when their agent connects.

use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use fleetbus_protocol::{ExecutionState, JobDocument};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::registry::KnownAgent;
use crate::JobsError;

/// How a job as a whole stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Executions are pending or running.
    Active,
    /// Every execution reached a final state.
    Done,
    /// Cancelled by an operator.
    Canceled,
    /// Cancelled by the abort threshold.
    Aborted,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Active => "active",
            JobState::Done => "done",
            JobState::Canceled => "canceled",
            JobState::Aborted => "aborted",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "done" => JobState::Done,
            "canceled" => JobState::Canceled,
            "aborted" => JobState::Aborted,
            _ => JobState::Active,
        }
    }
}

/// How a job is rolled out and when it is aborted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Targets sent the job per minute, at most (unset: all at once; a group job is then one
    /// publish on the group topic).
    #[serde(default)]
    pub max_per_minute: Option<u32>,
    /// Cancel the targets not started yet once this percentage of finished executions
    /// failed (FAILED, TIMED_OUT or REJECTED) ...
    #[serde(default)]
    pub abort_failure_pct: Option<f64>,
    /// ... and at least this many executions finished.
    #[serde(default)]
    pub abort_min_finished: u32,
}

/// One job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredJob {
    /// The document sent to agents.
    pub doc: JobDocument,
    /// Rollout and abort settings.
    pub rollout: Rollout,
    /// Where the job stands.
    pub state: JobState,
    /// The signed command payload, sent again to agents that connect later.
    #[serde(skip)]
    pub signed: Vec<u8>,
}

/// One target's execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// The target agent.
    pub agent: String,
    /// Where it stands.
    pub state: ExecutionState,
    /// When the job was last sent to it.
    pub sent: Option<DateTime<Utc>>,
    /// When the agent started it.
    pub started: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished: Option<DateTime<Utc>>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Head of its output.
    pub output: String,
    /// Why (rejection, failure, timeout, cancel).
    pub reason: Option<String>,
}

/// SQLite-backed store.
pub struct Ledger {
    db: Connection,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|m| Utc.timestamp_millis_opt(m).single())
}

impl Ledger {
    /// Opens (creating) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger, JobsError> {
        let db = open_db(
            path,
            "CREATE TABLE IF NOT EXISTS jobs (
                 id TEXT PRIMARY KEY, doc TEXT NOT NULL, rollout TEXT NOT NULL,
                 state TEXT NOT NULL, signed BLOB NOT NULL, created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS executions (
                 job_id TEXT NOT NULL, agent TEXT NOT NULL, state TEXT NOT NULL,
                 sent_ms INTEGER, started_ms INTEGER, finished_ms INTEGER, exit_code INTEGER,
                 output TEXT NOT NULL DEFAULT '', reason TEXT,
                 PRIMARY KEY (job_id, agent));
             CREATE INDEX IF NOT EXISTS executions_by_agent ON executions (agent, state);
             CREATE INDEX IF NOT EXISTS executions_by_state ON executions (state, sent_ms);",
        )?;
        Ok(Ledger { db })
    }

    /// Starts a transaction that groups the writes that follow until [`Ledger::commit`]:
    /// one fsync for a batch of status reports instead of one each. Writes that make
    /// their own transaction (a job's insertion) nest inside it as savepoints.
    pub fn begin(&mut self) -> Result<(), JobsError> {
        begin(&self.db)
    }

    /// Commits the transaction [`Ledger::begin`] started (rolls back if the commit fails,
    /// so the ledger is never left inside a transaction).
    pub fn commit(&mut self) -> Result<(), JobsError> {
        commit_or_roll_back(&self.db)
    }

    /// Stores a new job with one QUEUED execution per target, in one transaction.
    pub fn insert_job(&mut self, job: &StoredJob, targets: &[String]) -> Result<(), JobsError> {
        let tx = self.db.savepoint()?;
        tx.execute(
            "INSERT INTO jobs (id, doc, rollout, state, signed, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                job.doc.id,
                serde_json::to_string(&job.doc)?,
                serde_json::to_string(&job.rollout)?,
                job.state.as_str(),
                job.signed,
                ms(job.doc.created)
            ],
        )?;
        {
            let mut add = tx.prepare_cached(
                "INSERT OR IGNORE INTO executions (job_id, agent, state) VALUES (?1, ?2, 'QUEUED')",
            )?;
            for agent in targets {
                add.execute(params![job.doc.id, agent])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Adds a QUEUED execution for `agent` if the job has none. True when added.
    pub fn add_target(&mut self, job_id: &str, agent: &str) -> Result<bool, JobsError> {
        let n = self
            .db
            .prepare_cached(
                "INSERT OR IGNORE INTO executions (job_id, agent, state) VALUES (?1, ?2, 'QUEUED')",
            )?
            .execute(params![job_id, agent])?;
        Ok(n > 0)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<StoredJob>, JobsError> {
        self.db
            .prepare_cached("SELECT doc, rollout, state, signed FROM jobs WHERE id = ?1")?
            .query_row(params![id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .optional()?
            .map(|(doc, rollout, state, signed)| {
                Ok(StoredJob {
                    doc: serde_json::from_str(&doc)?,
                    rollout: serde_json::from_str(&rollout)?,
                    state: JobState::parse(&state),
                    signed,
                })
            })
            .transpose()
    }

    /// Ids of jobs, newest first.
    pub fn job_ids(&self, limit: usize, only_active: bool) -> Result<Vec<String>, JobsError> {
        let sql = match only_active {
            true => "SELECT id FROM jobs WHERE state = 'active' ORDER BY created_ms DESC LIMIT ?1",
            false => "SELECT id FROM jobs ORDER BY created_ms DESC LIMIT ?1",
        };
        let mut stmt = self.db.prepare_cached(sql)?;
        let ids = stmt
            .query_map(params![limit as i64], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// Sets a job's overall state.
    pub fn set_job_state(&mut self, id: &str, state: JobState) -> Result<(), JobsError> {
        self.db.execute(
            "UPDATE jobs SET state = ?2 WHERE id = ?1",
            params![id, state.as_str()],
        )?;
        Ok(())
    }

    /// Every execution of a job, by agent.
    pub fn executions(&self, job_id: &str) -> Result<Vec<Execution>, JobsError> {
        let mut stmt = self.db.prepare(
            "SELECT agent, state, sent_ms, started_ms, finished_ms, exit_code, output, reason
             FROM executions WHERE job_id = ?1 ORDER BY agent",
        )?;
        let rows = stmt
            .query_map(params![job_id], row_to_execution)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Executions of a job still IN_PROGRESS that started before `cutoff`.
    pub fn running_since_before(
        &self,
        job_id: &str,
        cutoff: DateTime<Utc>,
    ) -> Result<Vec<Execution>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT agent, state, sent_ms, started_ms, finished_ms, exit_code, output, reason
             FROM executions WHERE job_id = ?1 AND state = 'IN_PROGRESS' AND started_ms < ?2",
        )?;
        let rows = stmt
            .query_map(params![job_id, ms(cutoff)], row_to_execution)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One execution.
    pub fn execution(&self, job_id: &str, agent: &str) -> Result<Option<Execution>, JobsError> {
        Ok(self
            .db
            .prepare_cached(
                "SELECT agent, state, sent_ms, started_ms, finished_ms, exit_code, output, reason
                 FROM executions WHERE job_id = ?1 AND agent = ?2",
            )?
            .query_row(params![job_id, agent], row_to_execution)
            .optional()?)
    }

    /// `agent`'s latest executions (the latest change first), each with its job's id and
    /// operation, at most `limit`.
    pub fn recent_for(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Execution)>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT e.agent, e.state, e.sent_ms, e.started_ms, e.finished_ms, e.exit_code, e.output,
                    e.reason, e.job_id, json_extract(j.doc, '$.operation')
             FROM executions e JOIN jobs j ON j.id = e.job_id WHERE e.agent = ?1
             ORDER BY coalesce(e.finished_ms, e.started_ms, e.sent_ms, j.created_ms) DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![agent, limit as i64], |r| {
                Ok((
                    r.get::<_, String>(8)?,
                    r.get::<_, Option<String>>(9)?.unwrap_or_default(),
                    row_to_execution(r)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Job ids with a non-final execution for `agent`.
    pub fn pending_for(&self, agent: &str) -> Result<Vec<String>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT e.job_id FROM executions e JOIN jobs j ON j.id = e.job_id
             WHERE e.agent = ?1 AND e.state IN ('QUEUED', 'IN_PROGRESS') AND j.state = 'active'
             ORDER BY j.created_ms",
        )?;
        let ids = stmt
            .query_map(params![agent], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// Records that the job was sent to these agents now.
    pub fn mark_sent(
        &mut self,
        job_id: &str,
        agents: &[String],
        at: DateTime<Utc>,
    ) -> Result<(), JobsError> {
        let tx = self.db.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE executions SET sent_ms = ?3 WHERE job_id = ?1 AND agent = ?2",
            )?;
            for a in agents {
                stmt.execute(params![job_id, a, ms(at)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores several executions' new states in one transaction.
    pub fn update_executions(&mut self, job_id: &str, es: &[Execution]) -> Result<(), JobsError> {
        let tx = self.db.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(UPDATE_EXECUTION)?;
            for e in es {
                stmt.execute(execution_params(job_id, e))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores an execution's new state and details.
    pub fn update_execution(&mut self, job_id: &str, e: &Execution) -> Result<(), JobsError> {
        self.db
            .prepare_cached(UPDATE_EXECUTION)?
            .execute(execution_params(job_id, e))?;
        Ok(())
    }

    /// Agents an older version kept in the ledger (`agents` table), handed over once to
    /// the registry: the table is dropped after reading. Empty when there is none.
    pub fn take_legacy_agents(&mut self) -> Result<Vec<KnownAgent>, JobsError> {
        let exists: bool = self.db.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'agents'",
            [],
            |r| r.get(0),
        )?;
        if !exists {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .db
            .prepare("SELECT agent, groups, online, last_seen_ms FROM agents")?;
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
        drop(stmt);
        let agents = rows
            .into_iter()
            .map(|(agent, groups, online, seen)| {
                Ok(KnownAgent {
                    agent,
                    groups: serde_json::from_str(&groups)?,
                    online,
                    last_seen: from_ms(Some(seen)),
                    birth: None,
                })
            })
            .collect::<Result<Vec<_>, JobsError>>()?;
        Ok(agents)
    }

    /// Drops the table [`Ledger::take_legacy_agents`] read (once the registry has them).
    pub fn drop_legacy_agents(&mut self) -> Result<(), JobsError> {
        self.db.execute_batch("DROP TABLE IF EXISTS agents")?;
        Ok(())
    }

    /// Removes `agent` from the targets of active jobs it has not started (its QUEUED
    /// executions): the ids of the jobs it was removed from.
    pub fn remove_queued(&mut self, agent: &str) -> Result<Vec<String>, JobsError> {
        let tx = self.db.savepoint()?;
        let ids = {
            let mut stmt = tx.prepare_cached(
                "SELECT e.job_id FROM executions e JOIN jobs j ON j.id = e.job_id
                 WHERE e.agent = ?1 AND e.state = 'QUEUED' AND j.state = 'active'",
            )?;
            let ids = stmt
                .query_map(params![agent], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut delete = tx.prepare_cached(
                "DELETE FROM executions WHERE job_id = ?1 AND agent = ?2 AND state = 'QUEUED'",
            )?;
            for id in &ids {
                delete.execute(params![id, agent])?;
            }
            ids
        };
        tx.commit()?;
        Ok(ids)
    }

    /// Executions of active jobs still QUEUED that were last sent before `cutoff` (their
    /// agent never picked them up), with their job ids. Executions a rollout has not sent
    /// yet are not among them.
    pub fn queued_sent_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(String, Execution)>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT e.agent, e.state, e.sent_ms, e.started_ms, e.finished_ms, e.exit_code,
                    e.output, e.reason, e.job_id
             FROM executions e JOIN jobs j ON j.id = e.job_id
             WHERE e.state = 'QUEUED' AND e.sent_ms < ?1 AND j.state = 'active' LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![ms(cutoff), limit as i64], |r| {
                Ok((r.get::<_, String>(8)?, row_to_execution(r)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Active jobs created before `cutoff` that have no execution at all (a group job
    /// pushed with no known member that none joined).
    pub fn empty_jobs_created_before(
        &self,
        cutoff: DateTime<Utc>,
    ) -> Result<Vec<String>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT id FROM jobs j WHERE state = 'active' AND created_ms < ?1
             AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.job_id = j.id)",
        )?;
        let ids = stmt
            .query_map(params![ms(cutoff)], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// How many executions of a job are in each state.
    pub fn counts(
        &self,
        job_id: &str,
    ) -> Result<std::collections::BTreeMap<ExecutionState, usize>, JobsError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT state, COUNT(*) FROM executions WHERE job_id = ?1 GROUP BY state",
        )?;
        let rows = stmt
            .query_map(params![job_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .map(|(state, n)| {
                (
                    ExecutionState::parse(&state).unwrap_or(ExecutionState::Queued),
                    n as usize,
                )
            })
            .collect())
    }
}

/// Opens (creating) the SQLite file at `path` in WAL mode with full fsync and applies
/// `schema`: the ledger's and the registry's common ground.
pub(crate) fn open_db(path: &Path, schema: &str) -> Result<Connection, JobsError> {
    let db = Connection::open(path).map_err(|e| JobsError::ledger(path, e))?;
    db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .and_then(|_| db.execute_batch(schema))
        .map_err(|e| JobsError::ledger(path, e))?;
    Ok(db)
}

/// Starts a transaction on `db` (immediate: it takes the write lock now).
pub(crate) fn begin(db: &Connection) -> Result<(), JobsError> {
    db.execute_batch("BEGIN IMMEDIATE")?;
    Ok(())
}

/// Commits the open transaction of `db`, rolling it back if the commit fails (so the
/// connection is never left inside a transaction).
pub(crate) fn commit_or_roll_back(db: &Connection) -> Result<(), JobsError> {
    if let Err(e) = db.execute_batch("COMMIT") {
        let _ = db.execute_batch("ROLLBACK");
        return Err(e.into());
    }
    Ok(())
}

const UPDATE_EXECUTION: &str =
    "UPDATE executions SET state = ?3, started_ms = ?4, finished_ms = ?5, exit_code = ?6,
     output = ?7, reason = ?8 WHERE job_id = ?1 AND agent = ?2";

fn execution_params<'a>(job_id: &'a str, e: &'a Execution) -> impl rusqlite::Params + 'a {
    (
        job_id,
        e.agent.as_str(),
        e.state.as_str(),
        e.started.map(ms),
        e.finished.map(ms),
        e.exit_code,
        e.output.as_str(),
        e.reason.as_deref(),
    )
}

fn row_to_execution(r: &rusqlite::Row<'_>) -> rusqlite::Result<Execution> {
    let state: String = r.get(1)?;
    Ok(Execution {
        agent: r.get(0)?,
        state: ExecutionState::parse(&state).unwrap_or(ExecutionState::Queued),
        sent: from_ms(r.get(2)?),
        started: from_ms(r.get(3)?),
        finished: from_ms(r.get(4)?),
        exit_code: r.get(5)?,
        output: r.get(6)?,
        reason: r.get(7)?,
    })
}
