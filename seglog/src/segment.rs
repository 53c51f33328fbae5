//! One segment file: its name, its header, and the recovery scan.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{SegLogError, RECORD_OVERHEAD};

/// First bytes of every segment file.
pub(crate) const MAGIC: &[u8; 8] = b"FBLOG01\n";
/// Length of [`MAGIC`].
pub(crate) const HEADER_LEN: u64 = MAGIC.len() as u64;

/// `dir/{base:020}.seg`
pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// What the recovery scan found in one segment.
pub(crate) struct Scan {
    /// (offset, payload length) of each whole record.
    pub records: Vec<(u64, u32)>,
    /// (offset, bytes) cut from the end, if the tail was torn or corrupt.
    pub cut: Option<(u64, u64)>,
    /// Why the tail was cut.
    pub cut_reason: String,
}

/// Reads every whole record of the segment at `path` and truncates the file after the
/// last good one.
pub(crate) fn scan_segment(path: &Path, _base: u64, max_record: u32) -> Result<Scan, SegLogError> {
    let file = File::open(path).map_err(|e| SegLogError::io(path, "open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| SegLogError::io(path, "stat", e))?
        .len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut records = Vec::new();
    let mut magic = [0u8; 8];
    if file_len < HEADER_LEN {
        // a segment whose header write was torn: rewrite it empty
        rewrite_header(path)?;
        return Ok(Scan {
            records,
            cut: Some((0, file_len)),
            cut_reason: "segment header incomplete".into(),
        });
    }
    reader
        .read_exact(&mut magic)
        .map_err(|e| SegLogError::io(path, "read", e))?;
    if &magic != MAGIC {
        return Err(SegLogError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "not a fleetbus log segment (bad magic)".into(),
        });
    }
    let mut offset = HEADER_LEN;
    let mut payload = Vec::new();
    let reason = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break String::new();
        }
        if remaining < RECORD_OVERHEAD {
            break format!("{remaining} bytes of a record header");
        }
        let mut header = [0u8; 8];
        reader
            .read_exact(&mut header)
            .map_err(|e| SegLogError::io(path, "read", e))?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > max_record {
            break format!("record length {len} exceeds the limit {max_record}");
        }
        if len as u64 > remaining - RECORD_OVERHEAD {
            break format!(
                "record of {len} bytes but only {} bytes left",
                remaining - RECORD_OVERHEAD
            );
        }
        payload.resize(len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(|e| SegLogError::io(path, "read", e))?;
        if crc32fast::hash(&payload) != crc {
            break "record checksum mismatch".to_string();
        }
        records.push((offset, len));
        offset += RECORD_OVERHEAD + len as u64;
    };
    let cut = if offset < file_len {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| SegLogError::io(path, "open for repair", e))?;
        f.set_len(offset)
            .and_then(|_| f.sync_all())
            .map_err(|e| SegLogError::io(path, "truncate torn tail", e))?;
        Some((offset, file_len - offset))
    } else {
        None
    };
    Ok(Scan {
        records,
        cut,
        cut_reason: reason,
    })
}

fn rewrite_header(path: &Path) -> Result<(), SegLogError> {
    std::fs::write(path, MAGIC).map_err(|e| SegLogError::io(path, "rewrite header", e))
}
