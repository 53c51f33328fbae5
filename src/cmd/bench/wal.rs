//! `fleetbus bench wal`: appends per second with an fsync after every N appends (group
//! commit), for the segmented log the agent outbox and the server WAL are built on, and
//! side by side for two maintained embedded stores (redb, fjall) doing the same job.

use std::path::Path;
use std::time::{Duration, Instant};

use fleetbus_seglog::{SegLog, SegLogOptions};

/// The stores `bench wal` can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// Our segmented log (`seglog/`).
    Seglog,
    /// redb: a B-tree with copy-on-write pages; one write transaction per group.
    Redb,
    /// fjall: an LSM tree with a journal; `persist(SyncData)` per group.
    Fjall,
}

/// One measured configuration.
pub struct WalFigure {
    /// The store.
    pub store: Store,
    /// Appends per fsync.
    pub group: usize,
    /// Appends made.
    pub appends: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Appends `payload`-byte records for about `duration` for each store and group size.
pub fn measure(
    stores: &[Store],
    payload: usize,
    duration: Duration,
    groups: &[usize],
) -> anyhow::Result<Vec<WalFigure>> {
    let record = vec![0x5a_u8; payload];
    let mut out = Vec::new();
    for &store in stores {
        for &group in groups {
            let dir = tempfile::Builder::new()
                .prefix("fleetbus-bench-wal-")
                .tempdir()?;
            let (appends, elapsed) = match store {
                Store::Seglog => seglog(dir.path(), &record, group, duration)?,
                Store::Redb => redb(dir.path(), &record, group, duration)?,
                Store::Fjall => fjall(dir.path(), &record, group, duration)?,
            };
            out.push(WalFigure {
                store,
                group,
                appends,
                elapsed,
            });
        }
    }
    Ok(out)
}

fn seglog(
    dir: &Path,
    record: &[u8],
    group: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let (mut log, _) = SegLog::open(dir, SegLogOptions::default())?;
    let start = Instant::now();
    let mut appends = 0u64;
    while start.elapsed() < duration {
        for _ in 0..group {
            log.append(record)?;
        }
        log.sync()?;
        appends += group as u64;
    }
    Ok((appends, start.elapsed()))
}

fn redb(
    dir: &Path,
    record: &[u8],
    group: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
    let db = redb::Database::create(dir.join("log.redb"))?;
    let start = Instant::now();
    let mut appends = 0u64;
    while start.elapsed() < duration {
        let tx = db.begin_write()?; // commits with fsync (Durability::Immediate)
        {
            let mut table = tx.open_table(TABLE)?;
            for _ in 0..group {
                table.insert(appends, record)?;
                appends += 1;
            }
        }
        tx.commit()?;
    }
    Ok((appends, start.elapsed()))
}

fn fjall(
    dir: &Path,
    record: &[u8],
    group: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let db = fjall::Database::builder(dir).open()?;
    let log = db.keyspace("log", fjall::KeyspaceCreateOptions::default)?;
    let start = Instant::now();
    let mut appends = 0u64;
    while start.elapsed() < duration {
        for _ in 0..group {
            log.insert(appends.to_be_bytes(), record)?;
            appends += 1;
        }
        db.persist(fjall::PersistMode::SyncData)?;
    }
    Ok((appends, start.elapsed()))
}
