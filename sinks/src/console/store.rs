//! Where the event console is kept, and the one handle the `console` sink and the admin
//! endpoint use: SQLite (a file under the server's `data_dir`, the default) or PostgreSQL
//! (with a `url`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetbus_config::Problems;
use fleetbus_console::{
    CheckRow, CheckUpdate, Console, ConsoleError, EventRow, Filter, Incoming, RowState, Silence,
    SilenceRow,
};
use serde::{Deserialize, Serialize};

use super::pg::PgConsole;
use crate::secret::Secret;

/// Where the console is kept: the keys the `console` sink and the server's `[console]`
/// share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleLocation {
    /// The SQLite file, under the server's `data_dir` when relative (without `url`).
    pub path: PathBuf,
    /// A PostgreSQL database instead (`postgres://USER@HOST:PORT/DB?sslmode=require`),
    /// as the `postgres` sink takes it.
    pub url: Option<String>,
    /// Its password: `{ env = "NAME" }` or `{ file = "/path" }`.
    pub password: Option<Secret>,
    /// CA certificates (PEM) that sign the database server's certificate.
    pub ca_file: Option<PathBuf>,
    /// How long connecting, or one request, may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ConsoleLocation {
    fn default() -> Self {
        ConsoleLocation {
            path: PathBuf::from("console.sqlite"),
            url: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(30),
        }
    }
}

impl ConsoleLocation {
    /// Records the problems of these keys (relative to their table).
    pub fn check(&self, p: &mut Problems) {
        p.require(
            !self.path.as_os_str().is_empty(),
            "path",
            "is empty: name the console's database file",
        );
        if let Some(url) = &self.url {
            if let Err(e) = crate::postgres::connection_config(url, None, self.timeout) {
                p.add("url", e);
            }
        }
        crate::tls::check_ca_file(self.ca_file.as_deref(), p);
        p.require(
            (Duration::from_millis(100)..=Duration::from_secs(300)).contains(&self.timeout),
            "timeout",
            "must be between 100ms and 300s",
        );
    }

    /// The store these keys name (nothing is opened or connected yet), at most
    /// `max_open` open rows per agent.
    pub fn store(&self, data_dir: &Path, max_open: u32) -> Result<Store, String> {
        match &self.url {
            None => Ok(Store::Sqlite(Arc::new(SqliteStore {
                path: data_dir.join(&self.path),
                max_open,
                console: Mutex::new(None),
            }))),
            Some(url) => {
                let connection =
                    crate::postgres::connection_config(url, self.password.as_ref(), self.timeout)?;
                let pool =
                    crate::postgres::pool_of(connection, self.ca_file.as_deref(), 2, self.timeout)?;
                Ok(Store::Postgres(Arc::new(PgConsole::new(
                    pool,
                    crate::postgres::place_of(url),
                    max_open,
                ))))
            }
        }
    }
}

/// The console, in SQLite or in PostgreSQL; cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// A file (its blocking calls run on tokio's blocking pool).
    Sqlite(Arc<SqliteStore>),
    /// A PostgreSQL database.
    Postgres(Arc<PgConsole>),
}

/// The SQLite console, opened at the first use and again after an error.
pub struct SqliteStore {
    path: PathBuf,
    max_open: u32,
    console: Mutex<Option<Console>>,
}

impl SqliteStore {
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Console) -> Result<T, ConsoleError> + Send + 'static,
    ) -> Result<T, ConsoleError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = me.console.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(Console::open(&me.path)?.with_limit(me.max_open));
            }
            let Some(console) = guard.as_mut() else {
                return Err(ConsoleError::Request("the console is not open".into()));
            };
            let result = f(console);
            if matches!(result, Err(ConsoleError::Db { .. })) {
                *guard = None; // opened again next time
            }
            result
        })
        .await
        .unwrap_or_else(|e| Err(ConsoleError::Request(format!("console task: {e}"))))
    }
}

impl Store {
    /// The log position after the last batch `sink` folded in.
    pub async fn position(&self, sink: &str) -> Result<u64, ConsoleError> {
        match self {
            Store::Sqlite(s) => {
                let sink = sink.to_string();
                s.with(move |c| c.position(&sink)).await
            }
            Store::Postgres(p) => p.position(sink).await,
        }
    }

    /// Folds `events` in, keeps `checks` as their checks' latest results, and saves
    /// `next` as `sink`'s position, in one transaction.
    pub async fn fold(
        &self,
        sink: &str,
        events: Vec<(u64, Incoming)>,
        checks: Vec<(u64, CheckUpdate)>,
        next: u64,
    ) -> Result<(), ConsoleError> {
        match self {
            Store::Sqlite(s) => {
                let sink = sink.to_string();
                s.with(move |c| c.fold_with(&sink, &events, &checks, next))
                    .await
            }
            Store::Postgres(p) => p.fold(sink, &events, &checks, next).await,
        }
    }

    /// `agent`'s checks, each with its latest result.
    pub async fn checks(&self, agent: &str) -> Result<Vec<CheckRow>, ConsoleError> {
        match self {
            Store::Sqlite(s) => {
                let agent = agent.to_string();
                s.with(move |c| c.checks(&agent)).await
            }
            Store::Postgres(p) => p.checks(agent).await,
        }
    }

    /// The rows `filter` asks for, the latest first.
    pub async fn list(&self, filter: Filter) -> Result<Vec<EventRow>, ConsoleError> {
        match self {
            Store::Sqlite(s) => s.with(move |c| c.list(&filter)).await,
            Store::Postgres(p) => p.list(&filter).await,
        }
    }

    /// One row.
    pub async fn get(&self, id: i64) -> Result<EventRow, ConsoleError> {
        match self {
            Store::Sqlite(s) => s.with(move |c| c.get(id)).await,
            Store::Postgres(p) => p.get(id).await,
        }
    }

    /// Acknowledges (`to` acknowledged) or closes a row, by `who`, with `comment`.
    pub async fn change(
        &self,
        id: i64,
        to: RowState,
        comment: String,
        who: String,
    ) -> Result<EventRow, ConsoleError> {
        match self {
            Store::Sqlite(s) => {
                s.with(move |c| match to {
                    RowState::Closed => c.close(id, &comment, &who),
                    _ => c.acknowledge(id, &comment, &who),
                })
                .await
            }
            Store::Postgres(p) => p.change(id, to, &comment, &who).await,
        }
    }

    /// Adds a silence, by `who`.
    pub async fn silence(&self, s: Silence, who: String) -> Result<SilenceRow, ConsoleError> {
        match self {
            Store::Sqlite(store) => store.with(move |c| c.silence(&s, &who)).await,
            Store::Postgres(p) => p.silence(&s, &who).await,
        }
    }

    /// The silences in effect at `now`.
    pub async fn silences(&self, now: DateTime<Utc>) -> Result<Vec<SilenceRow>, ConsoleError> {
        match self {
            Store::Sqlite(s) => s.with(move |c| c.silences(now)).await,
            Store::Postgres(p) => p.silences(now).await,
        }
    }

    /// Deletes rows closed before `before` (and expired silences); how many rows.
    pub async fn purge(&self, before: DateTime<Utc>) -> Result<usize, ConsoleError> {
        match self {
            Store::Sqlite(s) => s.with(move |c| c.purge(before)).await,
            Store::Postgres(p) => p.purge(before).await,
        }
    }
}
