use std::path::Path;

use fleetbus_protocol::Message;

use super::*;
use crate::row::plain_identifier;
use crate::{ErrorClass, Item};

fn sink(dir: &Path, create_table: bool) -> Box<dyn Sink> {
    let config = SqliteSinkConfig {
        path: "db/fleet.sqlite".into(),
        table: "messages".into(),
        create_table,
        busy_timeout: Duration::from_secs(1),
        columns: BTreeMap::new(),
    };
    config.build(&SinkPlace::in_dir("db", dir)).unwrap()
}

/// Records `seqs` of agent `a` (log index = seq + 100), and after them one job event.
fn batch(seqs: std::ops::Range<u64>) -> Batch {
    let mut items: Vec<Item> = seqs
        .clone()
        .map(|i| {
            Item::new(
                100 + i,
                Message::decode(
                    "fleet/a/telemetry/metrics",
                    format!(r#"{{"seq":{i},"epoch":7,"ts":"2026-12-01T00:00:00Z"}}"#).as_bytes(),
                )
                .unwrap(),
            )
        })
        .collect();
    items.push(Item::new(
        100 + seqs.end,
        Message::decode("fleet/a/jobs/event", br#"{"job":"j1","state":"SUCCEEDED"}"#).unwrap(),
    ));
    Batch {
        first: 100 + seqs.start,
        next: 100 + seqs.end + 1,
        items,
    }
}

/// agent, epoch, seq, topic of a stored row.
type StoredRow = (Option<String>, Option<i64>, Option<i64>, String);

fn rows(dir: &Path) -> Vec<StoredRow> {
    let conn = Connection::open(dir.join("db/fleet.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT agent, epoch, seq, topic FROM messages ORDER BY rowid")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test]
async fn a_batch_written_again_is_in_the_table_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sink(dir.path(), true);
    assert!(s.exactly_once());
    s.write(&batch(1..6)).await.unwrap();
    // the worker retries a batch whose answer it did not see, and replays after a crash
    s.write(&batch(1..6)).await.unwrap();
    let mut again = sink(dir.path(), true);
    again.write(&batch(1..6)).await.unwrap();
    let got = rows(dir.path());
    assert_eq!(got.len(), 6, "{got:?}");
    let seqs: Vec<i64> = got.iter().filter_map(|r| r.2).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "records in order, once");
    assert_eq!(got[0].0.as_deref(), Some("a"));
    assert_eq!(got[0].1, Some(7));
    assert_eq!(
        got[5].3, "fleet/a/jobs/event",
        "the keyless event once as well"
    );
}

#[tokio::test]
async fn after_a_crash_the_sink_resumes_after_the_last_batch_the_database_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sink(dir.path(), true);
    assert_eq!(s.recover(3).await.unwrap(), 3, "nothing written yet");
    s.write(&batch(1..6)).await.unwrap();
    drop(s);
    // the worker saved position 101 before the crash; the database holds entries up to 106
    let mut s = sink(dir.path(), true);
    assert_eq!(s.recover(101).await.unwrap(), 107);
    assert_eq!(s.recover(200).await.unwrap(), 200);
}

#[tokio::test]
async fn a_row_the_table_refuses_is_named_and_nothing_of_its_batch_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("db")).unwrap();
    Connection::open(dir.path().join("db/fleet.sqlite"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE messages (agent TEXT, stream TEXT, epoch INTEGER, \
             seq INTEGER CHECK (seq <> 4), ts TEXT, topic TEXT NOT NULL, received TEXT NOT NULL, \
             message TEXT NOT NULL, UNIQUE (agent, stream, epoch, seq))",
        )
        .unwrap();
    let mut s = sink(dir.path(), false);
    let mut b = batch(1..8);
    let e = s.write(&b).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert_eq!(e.rejected_items(), Some(&[3][..]), "{e}");
    assert!(e.to_string().contains("CHECK constraint failed"), "{e}");
    assert!(rows(dir.path()).is_empty(), "the batch was rolled back");
    // what the worker does next: the refused row to the dead letter, the rest again
    b.items.remove(3);
    s.write(&b).await.unwrap();
    let seqs: Vec<i64> = rows(dir.path()).iter().filter_map(|r| r.2).collect();
    assert_eq!(seqs, [1, 2, 3, 5, 6, 7]);
}

#[tokio::test]
async fn a_missing_table_is_retried_until_an_operator_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sink(dir.path(), false);
    let e = s.write(&batch(1..3)).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert!(e.to_string().contains("no such table: messages"), "{e}");
    assert!(e.to_string().contains("fleet.sqlite"), "{e}");
    Connection::open(dir.path().join("db/fleet.sqlite"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE messages (agent TEXT, stream TEXT, epoch INTEGER, seq INTEGER, \
             ts TEXT, topic TEXT NOT NULL, received TEXT NOT NULL, message TEXT NOT NULL)",
        )
        .unwrap();
    s.write(&batch(1..3)).await.unwrap();
    assert_eq!(rows(dir.path()).len(), 3);
}

#[test]
fn a_table_name_must_be_a_plain_identifier() {
    for good in ["messages", "_t", "fleet_2026"] {
        assert!(plain_identifier(good), "{good}");
    }
    for bad in ["", "1t", "a-b", "a;drop table x", "t\"", &"x".repeat(64)] {
        assert!(!plain_identifier(bad), "{bad}");
    }
}

#[tokio::test]
async fn computed_columns_hold_their_expressions_values_and_a_failing_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config: SqliteSinkConfig = toml::from_str(
        r#"
path = "typed.sqlite"
table = "cpu"
columns = { host = "record.host", usage = "record.metrics[0].value", hot = "record.metrics[0].value > 90.0", labels = "record.metrics[0].labels" }
"#,
    )
    .unwrap();
    assert!(fleetbus_config::problems_of(&Checked(&config)).is_empty());
    let mut sink = config
        .build(&SinkPlace::in_dir("typed", dir.path()))
        .unwrap();
    let item = |index: u64, body: &str| {
        Item::new(
            index,
            Message::decode("fleet/web-1/telemetry/metrics", body.as_bytes()).unwrap(),
        )
    };
    let good =
        r#"{"seq":1,"host":"h1","metrics":[{"name":"cpu","value":97.5,"labels":{"cpu":"0"}}]}"#;
    let bare = r#"{"seq":2,"host":"h1"}"#;
    let cool = r#"{"seq":3,"host":"h2","metrics":[{"name":"cpu","value":5,"labels":{}}]}"#;
    let batch = Batch {
        first: 1,
        next: 4,
        items: vec![item(1, good), item(2, bare), item(3, cool)],
    };
    // the record without metrics cannot be a row: named, with the column that failed
    let e = sink.write(&batch).await.unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[1][..]), "{e}");
    assert!(
        e.to_string().contains("column hot: No such key: metrics"),
        "{e}"
    );
    let rest = Batch {
        first: 1,
        next: 4,
        items: vec![item(1, good), item(3, cool)],
    };
    sink.write(&rest).await.unwrap();

    let conn = rusqlite::Connection::open(dir.path().join("typed.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, host, usage, typeof(usage), hot, labels FROM cpu ORDER BY seq")
        .unwrap();
    let got: Vec<(i64, String, f64, String, i64, String)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        got,
        vec![
            (
                1,
                "h1".into(),
                97.5,
                "real".into(),
                1,
                r#"{"cpu":"0"}"#.into()
            ),
            (3, "h2".into(), 5.0, "integer".into(), 0, "{}".into()),
        ]
    );
    // no `message` column in this layout
    assert!(conn.prepare("SELECT message FROM cpu").is_err());
}

/// A sink type's checks, for `problems_of`.
struct Checked<'a>(&'a SqliteSinkConfig);

impl fleetbus_config::Check for Checked<'_> {
    fn check(&self, p: &mut Problems) {
        self.0.check(p);
    }
}

/// A templated `table` puts each message in the table its fields name, made in the batch's
/// transaction when missing; a batch written again (a replay after a crash) adds nothing,
/// and without `create_table` a missing table is an error the worker retries.
#[tokio::test]
async fn a_table_template_names_a_table_per_message_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = |create_table| SqliteSinkConfig {
        path: "db/fleet.sqlite".into(),
        table: "by_{agent}_{record.kind | 'none'}".into(),
        create_table,
        busy_timeout: Duration::from_secs(1),
        columns: BTreeMap::new(),
    };
    let item = |index: u64, topic: &str, body: &str| {
        Item::new(index, Message::decode(topic, body.as_bytes()).unwrap())
    };
    let batch = Batch {
        first: 1,
        next: 5,
        items: vec![
            item(1, "fleet/web-1/telemetry/m", r#"{"seq":1,"kind":"cpu"}"#),
            item(2, "fleet/web-2/telemetry/m", r#"{"seq":1,"kind":"cpu"}"#),
            item(3, "fleet/web-1/telemetry/m", r#"{"seq":2}"#),
            item(4, "fleet/web-1/telemetry/m", r#"{"seq":3,"kind":"cpu"}"#),
        ],
    };
    let mut sink = config(true)
        .build(&SinkPlace::in_dir("db", dir.path()))
        .unwrap();
    sink.write(&batch).await.unwrap();
    // a new sink (after a crash) writing the same batch: the position says it is there
    let mut again = config(true)
        .build(&SinkPlace::in_dir("db", dir.path()))
        .unwrap();
    again.write(&batch).await.unwrap();
    let conn = Connection::open(dir.path().join("db/fleet.sqlite")).unwrap();
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count("by_web_1_cpu"), 2);
    assert_eq!(count("by_web_2_cpu"), 1);
    assert_eq!(count("by_web_1_none"), 1);
    // without create_table a table nobody made is retried, not dropped
    let mut strict = config(false)
        .build(&SinkPlace::in_dir("db", dir.path()))
        .unwrap();
    let e = strict
        .write(&Batch {
            first: 5,
            next: 6,
            items: vec![item(5, "fleet/web-3/telemetry/m", r#"{"seq":1}"#)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(e.to_string().contains("by_web_3_none"), "{e}");
}
