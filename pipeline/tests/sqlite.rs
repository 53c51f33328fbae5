//! The SQLite sink behind the engine, against a real database file: rows in order and
//! exactly once (in batches of 50, the next one read ahead while one is written, so each
//! row's `message` must be its own record), a row the table refuses dead-lettered with the
//! database's error while the rows around it are written, and no row twice when the log
//! is read again after a crash.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{the_dead_letter, write_500_one_refused};
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;

const RULES: &str = r#"
[sinks.db]
type = "sqlite"
path = "fleet.sqlite"
create_table = false
dead_letter = "dlq"
# ten batches: each next one is read and rendered ahead while one is written
batch.max_events = 50

[sinks.dlq]
type = "file"
path = "dead/{agent}.jsonl"

[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["db"]
"#;

/// The operator's table: the default layout, with a constraint record 250 breaks.
const TABLE: &str = "CREATE TABLE messages (agent TEXT, stream TEXT, epoch INTEGER, \
    seq INTEGER CHECK (seq <> 250), ts TEXT, topic TEXT NOT NULL, received TEXT NOT NULL, \
    message TEXT NOT NULL, UNIQUE (agent, stream, epoch, seq))";

async fn start(dir: &Path, acked: &Arc<Mutex<usize>>) -> Engine {
    let set = RuleSet::parse(Path::new("rules.toml"), RULES).unwrap();
    let acked = acked.clone();
    let publisher = Publisher::new(move |_, _| {
        *acked.lock().unwrap() += 1;
        Ok(())
    });
    Engine::start(set, dir, EngineOptions::default(), publisher)
        .await
        .unwrap()
}

/// The rows' `seq`, in the order they were written; a row whose `message` is not its own
/// record (the JSON rendered ahead of the write for another message) would show as -1.
fn seqs(dir: &Path) -> Vec<u64> {
    let conn = rusqlite::Connection::open(dir.join("fleet.sqlite")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT CASE WHEN json_extract(message, '$.seq') = seq \
             AND json_extract(message, '$.agent') = agent THEN seq ELSE -1 END \
             FROM messages ORDER BY rowid",
        )
        .unwrap();
    stmt.query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|r| u64::try_from(r.unwrap()).unwrap_or(u64::MAX))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_once_in_order_and_a_refused_row_goes_to_the_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("fleet.sqlite"))
        .unwrap()
        .execute_batch(TABLE)
        .unwrap();
    let acked = Arc::default();
    let engine = start(dir.path(), &acked).await;
    write_500_one_refused(&engine, Duration::from_secs(20)).await;
    let expected: Vec<u64> = (1..=500).filter(|&s| s != 250).collect();
    assert_eq!(
        seqs(dir.path()),
        expected,
        "in order, once, the rows around 250 written"
    );
    let error = the_dead_letter(dir.path(), 250, "db");
    assert!(error.contains("CHECK constraint failed"), "{error}");

    // a crash before the worker saved its position: the log is read again from the start
    std::fs::remove_file(dir.path().join("wal/sinks/db.pos")).unwrap();
    let engine = start(dir.path(), &acked).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(seqs(dir.path()), expected, "nothing written twice");
}
