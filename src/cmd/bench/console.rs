//! `fleetbus bench console`: how fast the event console folds events when it already
//! holds many open rows. The console is filled with `open` rows (distinct fold keys),
//! then `events` events are folded in batches of 1,000 (the `console` sink's default
//! batch), each a repeat of a random open row's key (the common case: a problem that goes
//! on), in one transaction per batch as the sink does. Beside it, the same number of rows
//! inserted by plain rusqlite into a table with one index, in the same batches: the
//! database's own ceiling on the same disk.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use fleetbus_console::{Console, Incoming};
use fleetbus_protocol::{Event, Resource, Severity};

/// One measured path.
#[derive(Debug, Clone)]
pub struct ConsoleFigure {
    /// What was measured.
    pub what: String,
    /// Events (rows) written.
    pub events: u64,
    /// How long it took.
    pub elapsed: Duration,
}

const BATCH: usize = 1_000;

fn incoming(n: u64) -> Incoming {
    Incoming {
        agent: format!("agent-{}", n % 10_000),
        ts: Utc::now(),
        event: Event {
            class: "check.state".into(),
            severity: Severity::MAJOR,
            rule: Some(format!("check-{}", n / 10_000)),
            group: None,
            resources: vec![Resource {
                kind: "mount".into(),
                name: "/".into(),
            }],
            text: "DISK CRITICAL - / 97% used".into(),
            clear: false,
        },
        tags: BTreeMap::from([
            ("cloud".into(), "aws".into()),
            ("region".into(), "eu-west-1".into()),
        ]),
        groups: vec!["web".into()],
    }
}

/// Fills a console with `open` rows, then folds `events` repeats into it; then the
/// plain-insert ceiling.
pub fn run(open: u64, events: u64) -> anyhow::Result<Vec<ConsoleFigure>> {
    let tmp = tempfile::Builder::new()
        .prefix("fleetbus-bench-")
        .tempdir()?;
    let mut console = Console::open(&tmp.path().join("console.sqlite"))?;
    let mut index = 0u64;
    let mut fill = Vec::with_capacity(BATCH);
    let started = Instant::now();
    for n in 0..open {
        fill.push((index, incoming(n)));
        index += 1;
        if fill.len() == BATCH {
            console.fold("bench", &fill, index)?;
            fill.clear();
        }
    }
    if !fill.is_empty() {
        console.fold("bench", &fill, index)?;
    }
    let filled = started.elapsed();
    // repeats of open rows, spread over them (a fixed stride, so every batch hits rows
    // all over the index)
    let mut batch = Vec::with_capacity(BATCH);
    let started = Instant::now();
    for n in 0..events {
        let key = (n * 7_919) % open.max(1);
        batch.push((index, incoming(key)));
        index += 1;
        if batch.len() == BATCH {
            console.fold("bench", &batch, index)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        console.fold("bench", &batch, index)?;
    }
    let folded = started.elapsed();
    drop(console);

    let db = rusqlite::Connection::open(tmp.path().join("plain.sqlite"))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE plain (id INTEGER PRIMARY KEY, fold_key TEXT NOT NULL, body TEXT NOT NULL);
         CREATE INDEX plain_key ON plain (fold_key);",
    )?;
    let mut db = db;
    let started = Instant::now();
    let mut n = 0u64;
    while n < events {
        let tx = db.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO plain (fold_key, body) VALUES (?1, ?2)")?;
            for _ in 0..BATCH.min((events - n) as usize) {
                let e = incoming((n * 7_919) % open.max(1));
                let key = format!("{}|{}|{:?}", e.event.class, e.agent, e.event.rule);
                stmt.execute(rusqlite::params![key, serde_json::to_string(&e.tags)?])?;
                n += 1;
            }
        }
        tx.commit()?;
    }
    let plain = started.elapsed();
    Ok(vec![
        ConsoleFigure {
            what: format!("console: {open} new rows (filling it)"),
            events: open,
            elapsed: filled,
        },
        ConsoleFigure {
            what: format!("console: repeats folded into {open} open rows"),
            events,
            elapsed: folded,
        },
        ConsoleFigure {
            what: "plain rusqlite inserts, same batches (ceiling)".into(),
            events,
            elapsed: plain,
        },
    ])
}
