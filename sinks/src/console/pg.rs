//! The event console in PostgreSQL: the same rows, silences and positions as the SQLite
//! store (`fleetbus_console::Console`), folded the same way (by
//! [`fleetbus_console::fold_key`], with the same per-agent bound), over a small pool of
//! connections made like the `postgres` sink's (URL, password from the environment or a
//! file, TLS checked against `ca_file`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use fleetbus_console::{
    fold_key, json, ms, overflow_event, time, CheckRow, CheckUpdate, ConsoleError, EventRow,
    Filter, FilterValue, Incoming, RowState, Silence, SilenceRow,
};
use fleetbus_protocol::Event;
use tokio_postgres::types::ToSql;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS console_events (
    id bigserial PRIMARY KEY,
    fold_key text NOT NULL,
    class text NOT NULL, agent text NOT NULL, rule text, grp text,
    agent_groups jsonb NOT NULL, resources jsonb NOT NULL,
    severity smallint NOT NULL, state text NOT NULL,
    count bigint NOT NULL, first_ms bigint NOT NULL, last_ms bigint NOT NULL,
    text text NOT NULL, tags jsonb NOT NULL, silenced_by bigint,
    comment text, changed_by text, changed_ms bigint, closed_ms bigint);
CREATE UNIQUE INDEX IF NOT EXISTS console_one_live_row
    ON console_events (fold_key) WHERE state <> 'closed';
CREATE INDEX IF NOT EXISTS console_by_last ON console_events (last_ms);
CREATE INDEX IF NOT EXISTS console_by_agent ON console_events (agent) WHERE state <> 'closed';
CREATE INDEX IF NOT EXISTS console_closed ON console_events (closed_ms) WHERE state = 'closed';
CREATE TABLE IF NOT EXISTS console_silences (
    id bigserial PRIMARY KEY, agent text, rule text, grp text,
    until_ms bigint NOT NULL, comment text NOT NULL, created_by text NOT NULL,
    created_ms bigint NOT NULL);
CREATE TABLE IF NOT EXISTS console_positions (sink text PRIMARY KEY, next bigint NOT NULL);
CREATE TABLE IF NOT EXISTS console_checks (
    agent text NOT NULL, name text NOT NULL, status smallint NOT NULL, state_type text NOT NULL,
    output text NOT NULL, last_ms bigint NOT NULL, PRIMARY KEY (agent, name));
";

/// The columns of a row, jsonb as text.
const COLUMNS: &str = "id, class, agent, rule, grp, agent_groups::text, resources::text, severity, \
     state, count, first_ms, last_ms, text, tags::text, silenced_by, comment, changed_by, closed_ms";

/// The console in a PostgreSQL database.
pub struct PgConsole {
    pool: Pool,
    place: String,
    max_open: u32,
    schema_ready: AtomicBool,
}

fn row_of(r: &tokio_postgres::Row) -> EventRow {
    EventRow {
        id: r.get(0),
        class: r.get(1),
        agent: r.get(2),
        rule: r.get(3),
        group: r.get(4),
        agent_groups: json(r.get::<_, String>(5)),
        resources: json(r.get::<_, String>(6)),
        severity: u8::try_from(r.get::<_, i16>(7)).unwrap_or(0),
        state: RowState::parse(r.get::<_, &str>(8)),
        count: r.get::<_, i64>(9).max(0) as u64,
        first: time(r.get(10)),
        last: time(r.get(11)),
        text: r.get(12),
        tags: json::<BTreeMap<String, String>>(r.get::<_, String>(13)),
        silenced_by: r.get(14),
        comment: r.get(15),
        changed_by: r.get(16),
        closed: r.get::<_, Option<i64>>(17).map(time),
    }
}

impl PgConsole {
    /// The console in the database `pool` reaches (`place` names it in errors), at most
    /// `max_open` open rows per agent. Nothing is connected before the first use.
    pub fn new(pool: Pool, place: String, max_open: u32) -> PgConsole {
        PgConsole {
            pool,
            place,
            max_open: max_open.max(1),
            schema_ready: AtomicBool::new(false),
        }
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ConsoleError {
        ConsoleError::Remote(format!("postgres {}: {what}: {e}", self.place))
    }

    fn db(&self, what: &'static str) -> impl Fn(tokio_postgres::Error) -> ConsoleError + '_ {
        move |e| self.fail(what, crate::postgres::describe(&e))
    }

    /// A connection, the tables made once.
    async fn client(&self) -> Result<Object, ConsoleError> {
        let client = self.pool.get().await.map_err(|e| {
            let text = match &e {
                deadpool_postgres::PoolError::Backend(e) => crate::postgres::describe(e),
                other => other.to_string(),
            };
            self.fail("connect", text)
        })?;
        if !self.schema_ready.load(Ordering::Relaxed) {
            client
                .batch_execute(SCHEMA)
                .await
                .map_err(self.db("create the tables"))?;
            self.schema_ready.store(true, Ordering::Relaxed);
        }
        Ok(client)
    }

    /// The log position after the last batch `sink` folded in.
    pub async fn position(&self, sink: &str) -> Result<u64, ConsoleError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT next FROM console_positions WHERE sink = $1",
                &[&sink],
            )
            .await
            .map_err(self.db("read the position"))?;
        Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
    }

    /// Folds `events` in, keeps `checks` as their checks' latest results, and saves
    /// `next` as `sink`'s position, in one transaction.
    pub async fn fold(
        &self,
        sink: &str,
        events: &[(u64, Incoming)],
        checks: &[(u64, CheckUpdate)],
        next: u64,
    ) -> Result<(), ConsoleError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(self.db("begin"))?;
        // one batch at a time per sink: a concurrent fold of the same sink waits here
        let done: i64 = tx
            .query_opt(
                "SELECT next FROM console_positions WHERE sink = $1 FOR UPDATE",
                &[&sink],
            )
            .await
            .map_err(self.db("read the position"))?
            .map(|r| r.get(0))
            .unwrap_or(0);
        for (index, e) in events {
            if (*index as i64) < done {
                continue;
            }
            self.fold_one(&tx, e).await?;
        }
        for (index, c) in checks {
            if (*index as i64) < done {
                continue;
            }
            self.keep_check(&tx, c).await?;
        }
        let next = i64::try_from(next).map_err(|e| self.fail("position", e))?;
        tx.execute(
            "INSERT INTO console_positions (sink, next) VALUES ($1, $2)
             ON CONFLICT (sink) DO UPDATE SET next = GREATEST(console_positions.next, excluded.next)",
            &[&sink, &next],
        )
        .await
        .map_err(self.db("save the position"))?;
        tx.commit().await.map_err(self.db("commit"))
    }

    async fn fold_one(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        e: &Incoming,
    ) -> Result<(), ConsoleError> {
        let mut key = fold_key(&e.agent, &e.event);
        let at = ms(e.ts);
        if e.event.clear {
            tx.execute(
                "UPDATE console_events SET state = 'closed', closed_ms = $2, changed_ms = $2,
                 changed_by = 'recovery', comment = $3, last_ms = GREATEST(last_ms, $2)
                 WHERE fold_key = $1 AND state <> 'closed'",
                &[&key, &at, &e.event.text],
            )
            .await
            .map_err(self.db("close a row"))?;
            return Ok(());
        }
        let open_row = tx
            .query_opt(
                "SELECT id FROM console_events WHERE fold_key = $1 AND state <> 'closed'",
                &[&key],
            )
            .await
            .map_err(self.db("find the open row"))?;
        let overflow: Event;
        let mut ev = &e.event;
        if open_row.is_none() {
            let open: i64 = tx
                .query_one(
                    "SELECT count(*) FROM console_events WHERE agent = $1 AND state <> 'closed'",
                    &[&e.agent],
                )
                .await
                .map_err(self.db("count the agent's open rows"))?
                .get(0);
            if open >= i64::from(self.max_open) {
                overflow = overflow_event(e, self.max_open);
                key = fold_key(&e.agent, &overflow);
                ev = &overflow;
            }
        }
        let groups = serde_json::to_string(&e.groups).unwrap_or_else(|_| "[]".into());
        let silence: Option<i64> = tx
            .query_opt(
                "SELECT id FROM console_silences WHERE until_ms > $1
                 AND (agent IS NULL OR agent = $2) AND (rule IS NULL OR rule = $3)
                 AND (grp IS NULL OR grp = $4 OR $5::text::jsonb ? grp)
                 ORDER BY id LIMIT 1",
                &[&at, &e.agent, &ev.rule, &ev.group, &groups],
            )
            .await
            .map_err(self.db("look for a silence"))?
            .map(|r| r.get(0));
        let resources = serde_json::to_string(&ev.resources).unwrap_or_else(|_| "[]".into());
        let tags = serde_json::to_string(&e.tags).unwrap_or_else(|_| "{}".into());
        let severity = i16::from(ev.severity.level());
        tx.execute(
            "INSERT INTO console_events (fold_key, class, agent, rule, grp, agent_groups, resources,
                 severity, state, count, first_ms, last_ms, text, tags, silenced_by)
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, $8, 'open', 1, $9, $9,
                 $10, $11::text::jsonb, $12)
             ON CONFLICT (fold_key) WHERE state <> 'closed' DO UPDATE SET
                 count = console_events.count + 1,
                 first_ms = LEAST(console_events.first_ms, excluded.first_ms),
                 severity = CASE WHEN excluded.last_ms >= console_events.last_ms
                     THEN excluded.severity ELSE console_events.severity END,
                 text = CASE WHEN excluded.last_ms >= console_events.last_ms
                     THEN excluded.text ELSE console_events.text END,
                 tags = CASE WHEN excluded.last_ms >= console_events.last_ms
                     THEN excluded.tags ELSE console_events.tags END,
                 agent_groups = excluded.agent_groups,
                 silenced_by = excluded.silenced_by,
                 last_ms = GREATEST(console_events.last_ms, excluded.last_ms)",
            &[
                &key,
                &ev.class,
                &e.agent,
                &ev.rule,
                &ev.group,
                &groups,
                &resources,
                &severity,
                &at,
                &ev.text,
                &tags,
                &silence,
            ],
        )
        .await
        .map_err(self.db("fold an event"))?;
        Ok(())
    }

    /// Keeps `c` as its check's latest result (an older one changes nothing); an agent has
    /// at most `max_open` checks kept.
    async fn keep_check(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        c: &CheckUpdate,
    ) -> Result<(), ConsoleError> {
        let known = tx
            .query_opt(
                "SELECT 1 FROM console_checks WHERE agent = $1 AND name = $2",
                &[&c.agent, &c.name],
            )
            .await
            .map_err(self.db("find a check"))?
            .is_some();
        if !known {
            let kept: i64 = tx
                .query_one(
                    "SELECT count(*) FROM console_checks WHERE agent = $1",
                    &[&c.agent],
                )
                .await
                .map_err(self.db("count the agent's checks"))?
                .get(0);
            if kept >= i64::from(self.max_open) {
                return Ok(());
            }
        }
        tx.execute(
            "INSERT INTO console_checks (agent, name, status, state_type, output, last_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (agent, name) DO UPDATE SET status = excluded.status,
                 state_type = excluded.state_type, output = excluded.output, last_ms = excluded.last_ms
             WHERE excluded.last_ms >= console_checks.last_ms",
            &[&c.agent, &c.name, &i16::from(c.status), &c.state_type, &c.output, &ms(c.ts)],
        )
        .await
        .map_err(self.db("keep a check's result"))?;
        Ok(())
    }

    /// `agent`'s checks, each with its latest result, by name.
    pub async fn checks(&self, agent: &str) -> Result<Vec<CheckRow>, ConsoleError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, status, state_type, output, last_ms FROM console_checks
                 WHERE agent = $1 ORDER BY name",
                &[&agent],
            )
            .await
            .map_err(self.db("list checks"))?;
        Ok(rows
            .iter()
            .map(|r| CheckRow {
                name: r.get(0),
                status: u8::try_from(r.get::<_, i16>(1)).unwrap_or(3),
                state_type: r.get(2),
                output: r.get(3),
                last: time(r.get(4)),
            })
            .collect())
    }

    /// The rows `filter` asks for, the latest first.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<EventRow>, ConsoleError> {
        let (conditions, values) =
            filter.to_sql(|n| format!("${n}"), |m| format!("agent_groups ? {m}"));
        let sql = format!("SELECT {COLUMNS} FROM console_events{conditions}");
        let args: Vec<Box<dyn ToSql + Sync + Send>> = values
            .into_iter()
            .map(|v| -> Box<dyn ToSql + Sync + Send> {
                match v {
                    // severity is a smallint in this table
                    FilterValue::Int(n) => Box::new(i16::try_from(n).unwrap_or(i16::MAX)),
                    FilterValue::Text(t) => Box::new(t),
                }
            })
            .collect();
        let client = self.client().await?;
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client.query(&sql, &params).await.map_err(self.db("list"))?;
        Ok(rows.iter().map(row_of).collect())
    }

    /// One row.
    pub async fn get(&self, id: i64) -> Result<EventRow, ConsoleError> {
        let client = self.client().await?;
        client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM console_events WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(self.db("read"))?
            .map(|r| row_of(&r))
            .ok_or(ConsoleError::NotFound(id))
    }

    /// Acknowledges or closes a row that is not closed, by `who`, with `comment`.
    pub async fn change(
        &self,
        id: i64,
        to: RowState,
        comment: &str,
        who: &str,
    ) -> Result<EventRow, ConsoleError> {
        let client = self.client().await?;
        let now = ms(Utc::now());
        let changed = client
            .execute(
                "UPDATE console_events SET state = $2, comment = $3, changed_by = $4, changed_ms = $5,
                 closed_ms = CASE WHEN $2 = 'closed' THEN $5 ELSE closed_ms END
                 WHERE id = $1 AND state <> 'closed'",
                &[&id, &to.as_str(), &comment, &who, &now],
            )
            .await
            .map_err(self.db("change a row"))?;
        if changed == 0 {
            // no such row, or closed already: say which
            self.get(id).await?;
            return Err(ConsoleError::Request(format!(
                "event {id} is closed already"
            )));
        }
        self.get(id).await
    }

    /// Adds a silence (by `who`); the rows open now that it covers are marked too.
    pub async fn silence(&self, s: &Silence, who: &str) -> Result<SilenceRow, ConsoleError> {
        let now = Utc::now();
        let until = s.until(now)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(self.db("begin"))?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO console_silences (agent, rule, grp, until_ms, comment, created_by, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[&s.agent, &s.rule, &s.group, &ms(until), &s.comment, &who, &ms(now)],
            )
            .await
            .map_err(self.db("add a silence"))?
            .get(0);
        tx.execute(
            "UPDATE console_events SET silenced_by = $1 WHERE state <> 'closed'
             AND ($2::text IS NULL OR agent = $2) AND ($3::text IS NULL OR rule = $3)
             AND ($4::text IS NULL OR grp = $4 OR agent_groups ? $4)",
            &[&id, &s.agent, &s.rule, &s.group],
        )
        .await
        .map_err(self.db("mark the rows it covers"))?;
        tx.commit().await.map_err(self.db("commit"))?;
        Ok(SilenceRow {
            id,
            agent: s.agent.clone(),
            rule: s.rule.clone(),
            group: s.group.clone(),
            until,
            comment: s.comment.clone(),
            created_by: who.to_string(),
        })
    }

    /// The silences not expired at `now`.
    pub async fn silences(&self, now: DateTime<Utc>) -> Result<Vec<SilenceRow>, ConsoleError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, agent, rule, grp, until_ms, comment, created_by FROM console_silences
                 WHERE until_ms > $1 ORDER BY id",
                &[&ms(now)],
            )
            .await
            .map_err(self.db("list silences"))?;
        Ok(rows
            .iter()
            .map(|r| SilenceRow {
                id: r.get(0),
                agent: r.get(1),
                rule: r.get(2),
                group: r.get(3),
                until: time(r.get(4)),
                comment: r.get(5),
                created_by: r.get(6),
            })
            .collect())
    }

    /// Deletes rows closed before `before`, and silences expired before it; how many rows.
    pub async fn purge(&self, before: DateTime<Utc>) -> Result<usize, ConsoleError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM console_events WHERE state = 'closed' AND closed_ms < $1",
                &[&ms(before)],
            )
            .await
            .map_err(self.db("purge closed rows"))?;
        client
            .execute(
                "DELETE FROM console_silences WHERE until_ms < $1",
                &[&ms(before)],
            )
            .await
            .map_err(self.db("purge expired silences"))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}
