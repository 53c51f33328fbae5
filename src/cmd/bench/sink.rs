//! `fleetbus bench sink`: records per second from the server's write-ahead log into one
//! destination, beside that destination's own ceiling measured in the same run.
//!
//! 1. The log is filled first: the records are dispatched into an engine whose sink of the
//!    same name points at a receiver that is not there, so they wait in the log.
//! 2. The engine starts again with the real sink, and the clock runs from the moment its
//!    workers begin (after the start's replay of the log) until the sink has written every
//!    record: log → destination, nothing else.
//! 3. The ceiling of the same rows or bytes without fleetbus: `psql \copy` of the same rows
//!    (PostgreSQL), a plain HTTP client posting the same bodies (HTTP: to a receiver that
//!    parses them, then to one that discards them; two pairs of rows), one prepared
//!    statement in one transaction per batch (SQLite), a plain HTTP client posting the
//!    same line protocol to `/write` (InfluxDB).
//!
//! The peak resident memory of this process during step 2 (the destination's own memory
//! is not in it, but for the HTTP receiver, which runs here).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;
use fleetbus_testkit::influxdb::Influxd;
use fleetbus_testkit::postgres::{Postgres, PG_PASSWORD};

/// The destinations `bench sink` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// A PostgreSQL cluster made for the run (Debian's package, as the tests use).
    Postgres,
    /// An SQLite file in a temp directory.
    Sqlite,
    /// A webhook receiver in this process.
    Http,
    /// An InfluxDB 1.x server made for the run (Debian's package, as the tests use).
    Influxdb,
}

/// One row of the result table.
pub struct SinkFigure {
    /// What was measured.
    pub what: String,
    /// Records written.
    pub records: u64,
    /// Time taken.
    pub elapsed: Duration,
    /// Peak resident memory of this process meanwhile, in KiB (fleetbus rows only).
    pub peak_kib: Option<u64>,
}

/// The bench's record: about `payload` bytes of JSON, as an agent's metrics record (one
/// metric; a millisecond apart from the one before, so that each is its own point in a
/// time-series database).
pub(super) fn record(seq: u64, payload: usize) -> String {
    let ts = chrono::DateTime::UNIX_EPOCH
        + chrono::Duration::seconds(1_796_119_200)
        + chrono::Duration::milliseconds(seq as i64);
    let head = format!(
        r#"{{"seq":{seq},"epoch":1,"ts":"{}","host":"web-01","metrics":[{{"name":"cpu.usage","value":{}.5,"labels":{{"cpu":"total"}}}}],"pad":""#,
        ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        seq % 1000
    );
    let pad = payload.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// How the bench's records are published.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Encoding {
    /// MessagePack, as fleetbus agents publish them.
    Msgpack,
    /// JSON, as a third-party publisher may.
    Json,
}

/// Record `seq` as published in `encoding` (its JSON [`record`], or the same fields in
/// MessagePack).
fn published(seq: u64, payload: usize, encoding: Encoding) -> anyhow::Result<Vec<u8>> {
    let json = record(seq, payload);
    Ok(match encoding {
        Encoding::Json => json.into_bytes(),
        Encoding::Msgpack => {
            rmp_serde::to_vec_named(&serde_json::from_str::<serde_json::Value>(&json)?)?
        }
    })
}

const AGENTS: u64 = 4;

/// The topic of record `seq` (one of [`AGENTS`] agents).
pub(super) fn topic(seq: u64) -> String {
    format!("fleet/bench-{}/telemetry/metrics", seq % AGENTS)
}

/// Runs the bench for `sink` with `records` records of `payload` bytes (as JSON),
/// published in `encoding`.
pub async fn run(
    sink: SinkKind,
    records: u64,
    payload: usize,
    encoding: Encoding,
) -> anyhow::Result<Vec<SinkFigure>> {
    let dir = tempfile::Builder::new()
        .prefix("fleetbus-bench-sink-")
        .tempdir()?;
    match sink {
        SinkKind::Postgres => postgres(dir.path(), records, payload, encoding).await,
        SinkKind::Sqlite => sqlite(dir.path(), records, payload, encoding).await,
        SinkKind::Http => http(dir.path(), records, payload, encoding).await,
        SinkKind::Influxdb => influxdb(dir.path(), records, payload, encoding).await,
    }
}

/// Fills the log with `records` records routed to sink `db` (pointing nowhere), then
/// starts the engine with `sink_table` as `db` and times it until all are written.
async fn log_to_sink(
    dir: &Path,
    sink_table: &str,
    records: u64,
    payload: usize,
    encoding: Encoding,
) -> anyhow::Result<SinkFigure> {
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let rules = |sink: &str| {
        format!(
            "[sinks.db]\n{sink}\n\n[[rules]]\nname = \"all\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"db\"]\n"
        )
    };
    let parse = |text: String| {
        RuleSet::parse(Path::new("bench-rules.toml"), &text).map_err(|e| anyhow::anyhow!("{e}"))
    };
    // 1. fill the log; nothing listens at `nowhere` (its port was free and is closed again)
    let fill = parse(rules(&format!(
        "type = \"http\"\nurl = \"http://{nowhere}/\"\nbatch.retry_backoff = \"10s\""
    )))?;
    let engine = Engine::start(fill, dir, EngineOptions::default(), Publisher::discard())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for seq in 1..=records {
        engine.dispatch(&topic(seq), &published(seq, payload, encoding)?);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while engine.durable() < records {
        anyhow::ensure!(Instant::now() < deadline, "log not filled within 10 min");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.shutdown(Duration::from_millis(100)).await;
    drop(engine);
    tracing::info!(records, "log filled; now log → sink");

    // 2. log → destination
    // the clock starts when the engine has replayed its log (the start's cost, the same
    // for every sink) and its workers begin
    reset_peak_memory();
    let engine = Engine::start(
        parse(rules(sink_table))?,
        dir,
        EngineOptions::default(),
        Publisher::discard(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    loop {
        let stats = engine.stats();
        if stats.written("db") >= records {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("not written within 10 min: {stats:#?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let peak_kib = super::upload::peak_kib(std::process::id());
    engine.shutdown(Duration::from_secs(10)).await;
    Ok(SinkFigure {
        what: String::new(),
        records,
        elapsed,
        peak_kib,
    })
}

/// Resets this process's peak resident memory (VmHWM) to its current size (Linux).
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn postgres(
    dir: &Path,
    records: u64,
    payload: usize,
    encoding: Encoding,
) -> anyhow::Result<Vec<SinkFigure>> {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await??
        .context("PostgreSQL is not installed (Debian: apt-get install postgresql)")?;
    let pw = dir.join("pg-password");
    std::fs::write(&pw, PG_PASSWORD)?;
    let sink = format!(
        "type = \"postgres\"\nurl = \"{}\"\npassword = {{ file = \"{}\" }}\ntable = \"bench\"",
        pg.url(),
        pw.display()
    );
    let mut ours = log_to_sink(dir, &sink, records, payload, encoding).await?;
    ours.what = "fleetbus log → postgres sink (binary COPY per batch of 5000)".into();

    // the ceiling: the same rows by psql's COPY into a table of the same layout
    let client = pg.client().await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM bench", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        rows as u64 == records,
        "the table holds {rows} rows, not {records}"
    );
    client
        .batch_execute("CREATE TABLE copied (LIKE bench INCLUDING ALL)")
        .await?;
    let csv = dir.join("rows.csv");
    let out = std::process::Command::new(pg.bin().join("psql"))
        .arg(pg.url_with_password())
        .args(["-X", "-q", "-c"])
        .arg(format!("\\copy bench TO '{}' CSV", csv.display()))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "psql copy out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    let out = std::process::Command::new(pg.bin().join("psql"))
        .arg(pg.url_with_password())
        .args(["-X", "-q", "-c"])
        .arg(format!("\\copy copied FROM '{}' CSV", csv.display()))
        .output()?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "psql copy in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(vec![
        ours,
        SinkFigure {
            what: "psql \\copy of the same rows (same table layout and unique key)".into(),
            records,
            elapsed,
            peak_kib: None,
        },
    ])
}

async fn sqlite(
    dir: &Path,
    records: u64,
    payload: usize,
    encoding: Encoding,
) -> anyhow::Result<Vec<SinkFigure>> {
    let sink = "type = \"sqlite\"\npath = \"bench.sqlite\"\ntable = \"bench\"";
    let mut ours = log_to_sink(dir, sink, records, payload, encoding).await?;
    ours.what = "fleetbus log → sqlite sink (a transaction per batch of 1000)".into();
    // the ceiling: the same rows, one prepared insert, a transaction per 1000
    let path = dir.join("plain.sqlite");
    let elapsed = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE bench (agent TEXT, stream TEXT, epoch INTEGER, seq INTEGER, ts TEXT, \
             topic TEXT NOT NULL, received TEXT NOT NULL, message TEXT NOT NULL, \
             UNIQUE (agent, stream, epoch, seq))",
        )?;
        let started = Instant::now();
        let mut seq = 1;
        while seq <= records {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO bench VALUES (?1, 'metrics', 1, ?2, '2026-12-01T10:00:00.000Z', ?3, \
                     '2026-12-01T10:00:00.000Z', ?4) ON CONFLICT DO NOTHING",
                )?;
                for s in seq..(seq + 1000).min(records + 1) {
                    stmt.execute(rusqlite::params![
                        format!("bench-{}", s % AGENTS),
                        s as i64,
                        topic(s),
                        record(s, payload)
                    ])?;
                }
            }
            tx.commit()?;
            seq += 1000;
        }
        Ok(started.elapsed())
    })
    .await??;
    Ok(vec![
        ours,
        SinkFigure {
            what: "rusqlite: the same rows, prepared insert, a transaction per 1000".into(),
            records,
            elapsed,
            peak_kib: None,
        },
    ])
}

/// The two receivers of the HTTP bench: `/discard` takes a body and does nothing with it
/// (the literal ceiling: loopback and HTTP alone); `/parse` parses it as a JSON array, as
/// any receiver that does something with what it gets must (a destination's own work, as
/// PostgreSQL parses `COPY` rows and InfluxDB line protocol), and refuses what is not one.
fn http_receiver() -> axum::Router {
    axum::Router::new()
        .route(
            "/discard",
            axum::routing::post(|_body: axum::body::Bytes| async {
                axum::http::StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/parse",
            axum::routing::post(|body: axum::body::Bytes| async move {
                match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
                    Ok(records) if !records.is_empty() => axum::http::StatusCode::NO_CONTENT,
                    _ => axum::http::StatusCode::BAD_REQUEST,
                }
            }),
        )
}

/// The bytes the HTTP sink posts for the bench's records: each record's JSON as the sink
/// renders it (agent and stream from the topic), 500 to a JSON array.
fn http_bodies(records: u64, payload: usize, encoding: Encoding) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut bodies = Vec::new();
    for seqs in (1..=records).collect::<Vec<_>>().chunks(500) {
        let mut body = b"[".to_vec();
        for &seq in seqs {
            if body.len() > 1 {
                body.push(b',');
            }
            let published = published(seq, payload, encoding)?;
            fleetbus_protocol::write_json_body(&topic(seq), &published, &mut body)?;
        }
        body.push(b']');
        bodies.push(body);
    }
    Ok(bodies)
}

async fn http(
    dir: &Path,
    records: u64,
    payload: usize,
    encoding: Encoding,
) -> anyhow::Result<Vec<SinkFigure>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, http_receiver()).await });
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(
            fleetbus_sinks::tls::client_config(None).map_err(|e| anyhow::anyhow!(e))?,
        )
        .build()?;
    let mut rows = Vec::new();
    for (receiver, what) in [
        ("parse", "a receiver that parses each body"),
        ("discard", "a receiver that discards each body"),
    ] {
        let dir = dir.join(receiver);
        let sink = format!("type = \"http\"\nurl = \"http://{addr}/{receiver}\"");
        let mut ours = log_to_sink(&dir, &sink, records, payload, encoding).await?;
        ours.what = format!("fleetbus log → http sink, {what}");

        // the ceiling: one client posting the same bytes, one request at a time (made
        // after fleetbus's run, so that its peak memory holds none of them)
        let bodies = http_bodies(records, payload, encoding)?;
        let url = format!("http://{addr}/{receiver}");
        let started = Instant::now();
        for body in bodies {
            let status = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?
                .status();
            anyhow::ensure!(status.is_success(), "plain client: {status}");
        }
        let elapsed = started.elapsed();
        rows.push(ours);
        rows.push(SinkFigure {
            what: format!("plain reqwest client posting the same bytes, {what}"),
            records,
            elapsed,
            peak_kib: None,
        });
    }
    server.abort();
    Ok(rows)
}

async fn influxdb(
    dir: &Path,
    records: u64,
    payload: usize,
    encoding: Encoding,
) -> anyhow::Result<Vec<SinkFigure>> {
    let influx = tokio::task::spawn_blocking(Influxd::start)
        .await??
        .context("InfluxDB is not installed (Debian: apt-get install influxdb)")?;
    let sink = format!(
        "type = \"influxdb\"\nurl = \"{}\"\ndatabase = \"bench\"\ncreate_database = true",
        influx.url()
    );
    let mut ours = log_to_sink(dir, &sink, records, payload, encoding).await?;
    ours.what = "fleetbus log → influxdb sink (line protocol, 1000 points per request)".into();

    // the ceiling: the same points, 1000 per request, into a database of their own
    let measurement =
        fleetbus_sinks::influxdb::Measurement::parse("{metric}").map_err(|e| anyhow::anyhow!(e))?;
    let mut bodies = Vec::new();
    let mut body = String::new();
    for seq in 1..=records {
        let message =
            fleetbus_protocol::Message::decode(&topic(seq), record(seq, payload).as_bytes())?;
        let item = fleetbus_sinks::Item::new(seq, message);
        fleetbus_sinks::influxdb::points(&item, &measurement, &mut body)
            .map_err(|e| anyhow::anyhow!(e))?;
        if seq % 1000 == 0 || seq == records {
            bodies.push(std::mem::take(&mut body));
        }
    }
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(
            fleetbus_sinks::tls::client_config(None).map_err(|e| anyhow::anyhow!(e))?,
        )
        .build()?;
    let query = format!("{}/query", influx.url());
    client
        .post(&query)
        .query(&[("q", "CREATE DATABASE ceiling")])
        .send()
        .await?
        .error_for_status()?;
    let url = format!("{}/write?db=ceiling&precision=ns", influx.url());
    let started = Instant::now();
    for body in bodies {
        let status = client.post(&url).body(body).send().await?.status();
        anyhow::ensure!(status.is_success(), "plain client: {status}");
    }
    let elapsed = started.elapsed();
    Ok(vec![
        ours,
        SinkFigure {
            what: "plain reqwest client posting the same points to /write".into(),
            records,
            elapsed,
            peak_kib: None,
        },
    ])
}
