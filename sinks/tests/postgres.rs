//! The PostgreSQL sink against a real PostgreSQL (Debian's package, a cluster the test makes
//! in a temp directory): the default layout made and filled, a record already in the table
//! not written twice, a row the database refuses named by its SQLSTATE, and a missing table
//! or a wrong password reported as errors to retry, not as messages to drop; computed
//! columns cast to the table's types.

use std::path::Path;

use fleetbus_protocol::Message;
use fleetbus_sinks::{Batch, ErrorClass, Item, Sink, SinkConfig, SinkPlace};
use fleetbus_testkit::postgres::{Postgres, PG_PASSWORD};
use tokio_postgres::types::FromSql;

/// Each of `rows` as a tuple of its first seven columns.
fn seven_columns<A, B, C, D, E, F, G>(rows: &[tokio_postgres::Row]) -> Vec<(A, B, C, D, E, F, G)>
where
    A: for<'a> FromSql<'a>,
    B: for<'a> FromSql<'a>,
    C: for<'a> FromSql<'a>,
    D: for<'a> FromSql<'a>,
    E: for<'a> FromSql<'a>,
    F: for<'a> FromSql<'a>,
    G: for<'a> FromSql<'a>,
{
    rows.iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect()
}

fn sink(dir: &Path, pg: &Postgres, extra: &str) -> Box<dyn Sink> {
    let pw = dir.join("pg-password");
    std::fs::write(&pw, format!("{PG_PASSWORD}\n")).unwrap();
    let config: SinkConfig = toml::from_str(&format!(
        "type = \"postgres\"\nurl = \"{}\"\npassword = {{ file = \"{}\" }}\ntimeout = \"5s\"\n{extra}",
        pg.url(),
        pw.display()
    ))
    .unwrap();
    config.build(&SinkPlace::in_dir("pg", dir)).unwrap()
}

/// Records of agent `a1` with the given (log index, seq, text).
fn batch(records: &[(u64, u64, &str)]) -> Batch {
    let items = records
        .iter()
        .map(|&(index, seq, text)| {
            let body = serde_json::json!({"seq": seq, "epoch": 3, "ts": "2026-12-01T10:00:00.5Z", "text": text});
            Item::new(index,
                    Message::decode("fleet/a1/telemetry/app", body.to_string().as_bytes())
                        .unwrap(),
                )
        })
        .collect::<Vec<_>>();
    Batch {
        first: items.first().map_or(0, |i| i.index),
        next: items.last().map_or(0, |i| i.index + 1),
        items,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_once_with_their_key_columns_and_refusals_are_told_apart_from_outages() {
    let Some(pg) = Postgres::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let client = pg.client().await.unwrap();

    // the default layout, made by the sink
    let mut s = sink(dir.path(), &pg, "");
    s.write(&batch(&[(10, 1, "a"), (11, 2, "b"), (12, 3, "c")]))
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT agent, stream, epoch, seq, ts = '2026-12-01T10:00:00.5Z'::timestamptz, \
             message->>'text', pg_typeof(message)::text FROM messages ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, i64, i64, bool, String, String)> = seven_columns(&rows);
    assert_eq!(
        got,
        [1, 2, 3]
            .iter()
            .zip(["a", "b", "c"])
            .map(|(&seq, t)| (
                "a1".into(),
                "app".into(),
                3,
                seq,
                true,
                t.into(),
                "jsonb".into()
            ))
            .collect::<Vec<_>>()
    );

    // the same records again at later log positions (a replay the positions cannot
    // see): the unique key keeps one row each; the new one is written
    s.write(&batch(&[(20, 2, "b"), (21, 3, "c"), (22, 4, "d")]))
        .await
        .unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 4);

    // a batch the database already holds (an earlier position): skipped as a whole
    s.write(&batch(&[(11, 99, "never")])).await.unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM messages WHERE seq = 99", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count, 0,
        "entries before the stored position are not written"
    );

    // an operator's table with other column types (`ts` and `received` as text, the
    // message as json): inserted with casts instead of copied, duplicates skipped alike
    client
        .batch_execute(
            "CREATE TABLE typed (agent text, stream text, epoch bigint, seq bigint, ts text, \
             topic text, received text, message json, note text DEFAULT 'kept', \
             UNIQUE (agent, stream, epoch, seq))",
        )
        .await
        .unwrap();
    let mut typed = sink(dir.path(), &pg, "table = \"typed\"\ncreate_table = false\n");
    typed
        .write(&batch(&[(10, 1, "a"), (11, 2, "b")]))
        .await
        .unwrap();
    typed
        .write(&batch(&[(20, 2, "b"), (21, 3, "c")]))
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT seq, ts, message->>'text', note FROM typed ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got.iter()
            .map(|r| (r.0, r.2.as_str(), r.3.as_str()))
            .collect::<Vec<_>>(),
        [(1, "a", "kept"), (2, "b", "kept"), (3, "c", "kept")]
    );
    assert!(got[0].1.starts_with("2026-12-01"), "{got:?}");

    // jsonb cannot hold \u0000: the database refuses the row for good
    let e = s
        .write(&batch(&[(30, 5, "nul \u{0} inside")]))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.to_string().contains("22P05"), "{e}");
    // in a batch, COPY names the refused row: only it is set apart, not the batch
    let e = s
        .write(&batch(&[
            (31, 6, "ok"),
            (32, 7, "nul \u{0}"),
            (33, 8, "ok"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[1][..]), "{e}");
    assert!(e.to_string().contains("22P05"), "{e}");

    // a table the operator has not made: retried, with PostgreSQL's words
    let mut missing = sink(
        dir.path(),
        &pg,
        "table = \"not_made\"\ncreate_table = false\n",
    );
    let e = missing.write(&batch(&[(40, 6, "x")])).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(e.to_string().contains("42P01"), "{e}");
    assert!(e.to_string().contains("not_made"), "{e}");

    // a wrong password: retried, and said
    std::fs::write(dir.path().join("wrong"), "nope").unwrap();
    let config: SinkConfig = toml::from_str(&format!(
        "type = \"postgres\"\nurl = \"{}\"\npassword = {{ file = \"{}\" }}\n",
        pg.url(),
        dir.path().join("wrong").display()
    ))
    .unwrap();
    let mut wrong = config
        .build(&SinkPlace::in_dir("wrong", dir.path()))
        .unwrap();
    let e = wrong.write(&batch(&[(50, 7, "x")])).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_server_is_trusted_only_through_the_ca_file() {
    let Some(mut pg) = Postgres::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = fleetbus_testkit::tls::TestCa::new("pg-test-ca").unwrap();
    let ca_file = ca.write_ca(dir.path(), "ca").unwrap();
    let server = ca.issue(dir.path(), "pg", &["127.0.0.1"]).unwrap();
    pg.enable_tls(&server.cert, &server.key).unwrap();
    let pw = dir.path().join("pg-password");
    std::fs::write(&pw, PG_PASSWORD).unwrap();
    let tls_sink = |name: &str, ca: Option<&Path>| {
        let ca = ca.map_or(String::new(), |c| {
            format!("ca_file = \"{}\"\n", c.display())
        });
        let config: SinkConfig = toml::from_str(&format!(
            "type = \"postgres\"\nurl = \"{}?sslmode=require\"\npassword = {{ file = \"{}\" }}\ntimeout = \"5s\"\n{ca}",
            pg.url(),
            pw.display()
        ))
        .unwrap();
        config.build(&SinkPlace::in_dir(name, dir.path())).unwrap()
    };
    // the system's CAs do not know the test CA: refused, and retried
    let e = tls_sink("untrusted", None)
        .write(&batch(&[(1, 1, "x")]))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    // with the CA: written, over TLS (the sink's session stays open for the look below)
    let mut trusted = tls_sink("trusted", Some(&ca_file));
    trusted.write(&batch(&[(1, 1, "x")])).await.unwrap();
    let client = pg.client().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT bool_or(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'fleetbus'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the sink's session is encrypted");
    drop(trusted);
}

/// Metric records of agent `web-1` with the given (log index, JSON body).
fn metric_batch(records: &[(u64, &str)]) -> Batch {
    let items = records
        .iter()
        .map(|&(index, body)| {
            Item::new(
                index,
                Message::decode("fleet/web-1/telemetry/metrics", body.as_bytes()).unwrap(),
            )
        })
        .collect::<Vec<_>>();
    Batch {
        first: items.first().map_or(0, |i| i.index),
        next: items.last().map_or(0, |i| i.index + 1),
        items,
    }
}

/// seq, agent, host, usage, hot, labels->>'cpu', the type of usage.
type TypedRow = (i64, String, String, f64, bool, Option<String>, String);

const COLUMNS: &str = "columns = { host = \"record.host\", usage = \"record.metrics[0].value\", \
     hot = \"record.metrics[0].value > 90.0\", labels = \"record.metrics[0].labels\" }\n";
const GOOD: &str =
    r#"{"seq":1,"host":"h1","metrics":[{"name":"cpu","value":97.5,"labels":{"cpu":"0"}}]}"#;
const BARE: &str = r#"{"seq":2,"host":"h1"}"#;
const COOL: &str = r#"{"seq":3,"host":"h2","metrics":[{"name":"cpu","value":5,"labels":{}}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computed_columns_are_cast_to_the_tables_types_and_a_failing_expression_is_refused() {
    let Some(pg) = Postgres::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let client = pg.client().await.unwrap();

    // the operator's typed table
    client
        .batch_execute(
            "CREATE TABLE cpu (agent text, stream text, epoch bigint, seq bigint, ts timestamptz, \
             topic text, received timestamptz, host text, usage double precision, hot boolean, \
             labels jsonb, UNIQUE (agent, stream, epoch, seq))",
        )
        .await
        .unwrap();
    let mut s = sink(
        dir.path(),
        &pg,
        &format!("table = \"cpu\"\ncreate_table = false\n{COLUMNS}"),
    );
    // the record without metrics cannot be a row: named, with the column that failed
    let e = s
        .write(&metric_batch(&[(1, GOOD), (2, BARE), (3, COOL)]))
        .await
        .unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[1][..]), "{e}");
    assert!(
        e.to_string().contains("column hot: No such key: metrics"),
        "{e}"
    );
    s.write(&metric_batch(&[(1, GOOD), (3, COOL)]))
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT seq, agent, host, usage, hot, labels->>'cpu', pg_typeof(usage)::text \
             FROM cpu ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<TypedRow> = seven_columns(&rows);
    assert_eq!(
        got,
        vec![
            (
                1,
                "web-1".into(),
                "h1".into(),
                97.5,
                true,
                Some("0".into()),
                "double precision".into()
            ),
            (
                3,
                "web-1".into(),
                "h2".into(),
                5.0,
                false,
                None,
                "double precision".into()
            ),
        ]
    );

    // a value the column's type cannot take: refused by the database, for good
    let mut wrong = sink(
        dir.path(),
        &pg,
        "table = \"cpu\"\ncreate_table = false\ncolumns = { usage = \"record.host\" }\n",
    );
    let e = wrong.write(&metric_batch(&[(10, GOOD)])).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.to_string().contains("22P02"), "{e}");

    // a computed column the table lacks: retried until an operator adds it
    let mut lacking = sink(
        dir.path(),
        &pg,
        "table = \"cpu\"\ncreate_table = false\ncolumns = { load = \"record.seq\" }\n",
    );
    let e = lacking
        .write(&metric_batch(&[(20, GOOD)]))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(e.to_string().contains("no column `load`"), "{e}");

    // a table the sink makes: its computed columns are jsonb, and hold any value
    let mut made = sink(dir.path(), &pg, &format!("table = \"made\"\n{COLUMNS}"));
    made.write(&metric_batch(&[(1, GOOD)])).await.unwrap();
    let row = client
        .query_one(
            "SELECT host::text, usage::text, hot::text, labels::text, pg_typeof(usage)::text \
             FROM made",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<String> = (0..5).map(|n| row.get(n)).collect();
    assert_eq!(got, ["\"h1\"", "97.5", "true", r#"{"cpu": "0"}"#, "jsonb"]);
}

/// A templated `table` puts each message in the table its fields name: made in the
/// batch's transaction (a keyword such as `order` too), the fast `COPY` per table, one
/// position for all (a batch written again adds nothing), a record already in its table
/// skipped, and a row one of the tables refuses named by its place in the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_template_names_a_table_per_message_each_row_once() {
    let Some(pg) = Postgres::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let client = pg.client().await.unwrap();
    let template = "table = \"{record.kind | 'other'}\"\n";
    let mut s = sink(dir.path(), &pg, template);
    let batch = metric_batch(&[
        (1, r#"{"seq":1,"kind":"cpu"}"#),
        (2, r#"{"seq":2,"kind":"ORDER"}"#),
        (3, r#"{"seq":3}"#),
        (4, r#"{"seq":4,"kind":"cpu"}"#),
    ]);
    s.write(&batch).await.unwrap();
    // a new sink (after a crash) writing the same batch: the position says it is there
    let mut again = sink(dir.path(), &pg, template);
    again.write(&batch).await.unwrap();
    let seqs = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query(&format!("SELECT seq FROM {table} ORDER BY seq"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(seqs("cpu").await, [1, 4]);
    assert_eq!(seqs("\"order\"").await, [2]);
    assert_eq!(seqs("other").await, [3]);
    let position: i64 = client
        .query_one(
            "SELECT next FROM fleetbus_sink_positions WHERE tbl = $1",
            &[&"{record.kind | 'other'}"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(position, 5, "one position for all the tables");

    // a record already in its table (put there by hand) is skipped, the others land
    client
        .execute(
            "INSERT INTO cpu (agent, stream, epoch, seq, topic, received, message) \
             VALUES ('web-1', 'metrics', 1, 5, 't', now(), '{}')",
            &[],
        )
        .await
        .unwrap();
    s.write(&metric_batch(&[
        (5, r#"{"seq":6,"kind":"disk"}"#),
        (6, r#"{"epoch":1,"seq":5,"kind":"cpu"}"#),
        (7, r#"{"epoch":1,"seq":7,"kind":"cpu"}"#),
    ]))
    .await
    .unwrap();
    assert_eq!(seqs("cpu").await, [1, 4, 5, 7]);
    assert_eq!(seqs("disk").await, [6]);

    // jsonb cannot hold \u0000: the refused row is named by its place in the batch
    let e = s
        .write(&metric_batch(&[
            (8, r#"{"seq":8,"kind":"cpu"}"#),
            (9, r#"{"seq":9,"kind":"disk"}"#),
            (10, r#"{"seq":10,"kind":"disk","text":"nul \u0000"}"#),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[2][..]), "{e}");
    assert!(e.to_string().contains("22P05"), "{e}");

    // without create_table a table nobody made is retried, with PostgreSQL's words
    let mut strict = sink(
        dir.path(),
        &pg,
        &format!("{template}create_table = false\n"),
    );
    let e = strict
        .write(&metric_batch(&[(11, r#"{"seq":11,"kind":"gpu"}"#)]))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(e.to_string().contains("42P01"), "{e}");
    assert!(e.to_string().contains("gpu"), "{e}");
}
