//! The PostgreSQL sink behind the engine, against a real PostgreSQL (Debian's package, a
//! cluster the test makes): every row once, a row that breaks the table's constraint
//! dead-lettered with the database's error while the rows around it are written, and no
//! row twice when the log is read again after a crash, even in a table without a unique
//! key (the positions committed with each batch alone keep it exactly once).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{the_dead_letter, write_500_one_refused};
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;
use fleetbus_testkit::postgres::{Postgres, PG_PASSWORD};

/// The operator's table: the default columns, no unique key, and a constraint record 250
/// breaks.
const TABLE: &str = "CREATE TABLE messages (agent text, stream text, epoch bigint, \
    seq bigint CHECK (seq <> 250), ts timestamptz, topic text NOT NULL, \
    received timestamptz NOT NULL, message jsonb NOT NULL)";

async fn start(dir: &Path, pg: &Postgres) -> Engine {
    let pw = dir.join("pg-password");
    std::fs::write(&pw, PG_PASSWORD).unwrap();
    let rules = format!(
        r#"
[sinks.db]
type = "postgres"
url = "{}"
password = {{ file = "{}" }}
create_table = false
dead_letter = "dlq"
batch.max_events = 100

[sinks.dlq]
type = "file"
path = "dead/{{agent}}.jsonl"

[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["db"]
"#,
        pg.url(),
        pw.display()
    );
    let set = RuleSet::parse(Path::new("rules.toml"), &rules).unwrap();
    Engine::start(set, dir, EngineOptions::default(), Publisher::discard())
        .await
        .unwrap()
}

/// The rows' `seq`; a row whose `message` is not its own record (the JSON rendered ahead
/// of the write for another message) shows as -1.
async fn seqs(client: &tokio_postgres::Client) -> Vec<i64> {
    client
        .query(
            "SELECT CASE WHEN (message->>'seq')::bigint = seq AND message->>'agent' = agent \
             THEN seq ELSE -1 END FROM messages ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_once_a_refused_row_is_dead_lettered_and_a_replay_writes_nothing_twice() {
    let Some(pg) = Postgres::start().unwrap() else {
        return;
    };
    let client = pg.client().await.unwrap();
    client.batch_execute(TABLE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path(), &pg).await;
    write_500_one_refused(&engine, Duration::from_secs(30)).await;
    let expected: Vec<i64> = (1..=500).filter(|&s| s != 250).collect();
    assert_eq!(
        seqs(&client).await,
        expected,
        "once each, the rows around 250 written"
    );
    let error = the_dead_letter(dir.path(), 250, "db");
    assert!(error.contains("23514"), "{error}");
    assert!(error.contains("messages_seq_check"), "{error}");

    // a crash before the worker saved its position: the log is read again from the start
    std::fs::remove_file(dir.path().join("wal/sinks/db.pos")).unwrap();
    let engine = start(dir.path(), &pg).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = engine.stats();
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        seqs(&client).await,
        expected,
        "nothing written twice: {stats:#?}"
    );
}
