//! `fleetbus-bench pg-drivers` (built with `--features bench-sqlx`): the two PostgreSQL
//! drivers issue 17 names, tokio-postgres (the sink's) and sqlx, writing the same rows the
//! PostgreSQL sink's way: a transaction per batch holding the rows and the position
//! update, by each of the sink's two statements, a binary `COPY` (the sink's own encoding,
//! the same bytes for both drivers) and one `INSERT ... SELECT * FROM unnest(...)` of one
//! array per column (each driver encodes the arrays). One cluster, a fresh table per
//! run, the drivers alternated round by round.

use std::time::{Duration, Instant};

use anyhow::Context;
use fleetbus_sinks::postgres::Columns;
use fleetbus_sinks::Item;
use fleetbus_testkit::postgres::Postgres;
use futures_util::SinkExt;
use sqlx::Connection;

use super::sink::{record, topic};

/// One measured run.
pub struct DriverFigure {
    /// Driver and statement.
    pub what: &'static str,
    /// Rows written.
    pub records: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// One batch's rows, as `COPY` data and as one array per column.
struct BatchRows {
    copy: bytes::Bytes,
    rows: Columns,
    next: i64,
}

const TABLE: &str = "CREATE TABLE rows (agent text, stream text, epoch bigint, seq bigint, \
     ts timestamptz, topic text NOT NULL, received timestamptz NOT NULL, message jsonb NOT NULL, \
     UNIQUE (agent, stream, epoch, seq))";
const COPY: &str = "COPY rows (agent, stream, epoch, seq, ts, topic, received, message) \
     FROM STDIN BINARY";
const UNNEST: &str = "INSERT INTO rows (agent, stream, epoch, seq, ts, topic, received, message) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::timestamptz[], \
     $6::text[], $7::timestamptz[], $8::text[]::jsonb[])";
const POSITION: &str = "INSERT INTO positions (sink, next) VALUES ('bench', $1) \
     ON CONFLICT (sink) DO UPDATE SET next = GREATEST(positions.next, excluded.next)";

/// The batches of `records` bench records, `batch` rows each.
fn batches(records: u64, batch: usize, payload: usize) -> anyhow::Result<Vec<BatchRows>> {
    let mut items = Vec::new();
    for seq in 1..=records {
        let message =
            fleetbus_protocol::Message::decode(&topic(seq), record(seq, payload).as_bytes())?;
        items.push(Item::new(seq, message));
    }
    let mut out = Vec::new();
    for chunk in items.chunks(batch.max(1)) {
        let rows = Columns::of(chunk)?;
        out.push(BatchRows {
            copy: rows.copy_data()?,
            next: rows.index.last().map_or(0, |&i| i as i64 + 1),
            rows,
        });
    }
    Ok(out)
}

/// Runs `rounds` rounds of the four runs over `records` rows in batches of `batch`.
pub async fn run(records: u64, batch: usize, rounds: usize) -> anyhow::Result<Vec<DriverFigure>> {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await??
        .context("PostgreSQL is not installed (Debian: apt-get install postgresql)")?;
    let batches = batches(records, batch, 200)?;
    let tp = pg.client().await?;
    let mut sx = sqlx::PgConnection::connect(&pg.url_with_password()).await?;
    let mut figures = Vec::new();
    for _ in 0..rounds {
        for what in [
            "tokio-postgres, binary COPY",
            "sqlx, binary COPY",
            "tokio-postgres, unnest insert",
            "sqlx, unnest insert",
        ] {
            tp.batch_execute(&format!(
                "DROP TABLE IF EXISTS rows; DROP TABLE IF EXISTS positions; {TABLE}; \
                 CREATE TABLE positions (sink text PRIMARY KEY, next bigint NOT NULL); CHECKPOINT"
            ))
            .await?;
            let started = Instant::now();
            match what {
                "tokio-postgres, binary COPY" => tokio_postgres_copy(&tp, &batches).await?,
                "sqlx, binary COPY" => sqlx_copy(&mut sx, &batches).await?,
                "tokio-postgres, unnest insert" => tokio_postgres_unnest(&tp, &batches).await?,
                _ => sqlx_unnest(&mut sx, &batches).await?,
            }
            let elapsed = started.elapsed();
            let rows: i64 = tp.query_one("SELECT count(*) FROM rows", &[]).await?.get(0);
            anyhow::ensure!(rows as u64 == records, "{what}: {rows} rows, not {records}");
            figures.push(DriverFigure {
                what,
                records,
                elapsed,
            });
        }
    }
    Ok(figures)
}

async fn tokio_postgres_copy(
    c: &tokio_postgres::Client,
    batches: &[BatchRows],
) -> anyhow::Result<()> {
    let position = c.prepare(POSITION).await?;
    for b in batches {
        c.batch_execute("BEGIN").await?;
        let sink = c.copy_in(COPY).await?;
        tokio::pin!(sink);
        sink.send(b.copy.clone()).await?;
        sink.as_mut().finish().await?;
        c.execute(&position, &[&b.next]).await?;
        c.batch_execute("COMMIT").await?;
    }
    Ok(())
}

async fn sqlx_copy(c: &mut sqlx::PgConnection, batches: &[BatchRows]) -> anyhow::Result<()> {
    for b in batches {
        sqlx::raw_sql("BEGIN").execute(&mut *c).await?;
        let mut copy = c.copy_in_raw(COPY).await?;
        copy.send(b.copy.as_ref()).await?;
        copy.finish().await?;
        sqlx::query(POSITION).bind(b.next).execute(&mut *c).await?;
        sqlx::raw_sql("COMMIT").execute(&mut *c).await?;
    }
    Ok(())
}

async fn tokio_postgres_unnest(
    c: &tokio_postgres::Client,
    batches: &[BatchRows],
) -> anyhow::Result<()> {
    let position = c.prepare(POSITION).await?;
    let insert = c.prepare(UNNEST).await?;
    for b in batches {
        c.batch_execute("BEGIN").await?;
        c.execute(
            &insert,
            &[
                &b.rows.agent as &(dyn tokio_postgres::types::ToSql + Sync),
                &b.rows.stream,
                &b.rows.epoch,
                &b.rows.seq,
                &b.rows.ts,
                &b.rows.topic,
                &b.rows.received,
                &b.rows.message,
            ],
        )
        .await?;
        c.execute(&position, &[&b.next]).await?;
        c.batch_execute("COMMIT").await?;
    }
    Ok(())
}

async fn sqlx_unnest(c: &mut sqlx::PgConnection, batches: &[BatchRows]) -> anyhow::Result<()> {
    for b in batches {
        sqlx::raw_sql("BEGIN").execute(&mut *c).await?;
        sqlx::query(UNNEST)
            .bind(&b.rows.agent)
            .bind(&b.rows.stream)
            .bind(&b.rows.epoch)
            .bind(&b.rows.seq)
            .bind(&b.rows.ts)
            .bind(&b.rows.topic)
            .bind(&b.rows.received)
            .bind(&b.rows.message)
            .execute(&mut *c)
            .await?;
        sqlx::query(POSITION).bind(b.next).execute(&mut *c).await?;
        sqlx::raw_sql("COMMIT").execute(&mut *c).await?;
    }
    Ok(())
}
