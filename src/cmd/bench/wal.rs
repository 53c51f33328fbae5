//! `fleetbus bench wal`: appends per second to the segmented log the agent outbox and the
//! server WAL are built on, with an fsync after every N appends (group commit).

use std::time::{Duration, Instant};

use fleetbus_seglog::{SegLog, SegLogOptions};

/// One measured configuration.
pub struct WalFigure {
    /// Appends per fsync.
    pub group: usize,
    /// Appends made.
    pub appends: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Appends `payload`-byte records for about `duration` for each group size.
pub fn measure(
    payload: usize,
    duration: Duration,
    groups: &[usize],
) -> anyhow::Result<Vec<WalFigure>> {
    let record = vec![0x5a_u8; payload];
    let mut out = Vec::new();
    for &group in groups {
        let dir = tempfile::Builder::new()
            .prefix("fleetbus-bench-wal-")
            .tempdir()?;
        let (mut log, _) = SegLog::open(dir.path(), SegLogOptions::default())?;
        let start = Instant::now();
        let mut appends = 0u64;
        while start.elapsed() < duration {
            for _ in 0..group {
                log.append(&record)?;
            }
            log.sync()?;
            appends += group as u64;
        }
        out.push(WalFigure {
            group,
            appends,
            elapsed: start.elapsed(),
        });
    }
    Ok(out)
}
