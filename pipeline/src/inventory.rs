//! What a file sink wrote: every JSON-lines file under a directory, and per (agent, stream)
//! how many records arrived, the first and last sequence numbers, and any gaps, duplicates
//! or reordering. Used by `fleetbus demo` to show what arrived where, and by tests and
//! operators to audit delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Delivery summary of one (agent, stream).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Lines (records) found.
    pub records: u64,
    /// Lowest sequence number.
    pub first_seq: u64,
    /// Highest sequence number.
    pub last_seq: u64,
    /// Records seen more than once (same epoch and seq; count of extra copies). Two records
    /// with one seq and different epochs are different records (an agent whose outbox
    /// started a new epoch numbers again).
    pub duplicates: u64,
    /// Sequence numbers between first and last never seen.
    pub missing: u64,
    /// Records that arrived for the first time after a higher seq of the same stream in the
    /// same file (re-sent copies are counted as duplicates, not here).
    pub out_of_order: u64,
}

impl StreamSummary {
    /// Every record from `first_seq` to `last_seq` exactly once, in order.
    pub fn is_contiguous(&self) -> bool {
        self.duplicates == 0 && self.missing == 0 && self.out_of_order == 0
    }
}

/// Everything found under a directory.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Every `.jsonl` file: (path, lines, bytes).
    pub files: Vec<(PathBuf, u64, u64)>,
    /// Per (agent, stream).
    pub streams: BTreeMap<(String, String), StreamSummary>,
    /// Lines that were not JSON objects with agent, stream and seq.
    pub unparsable: u64,
}

/// Reads every `*.jsonl` file below `dir` (a missing directory is an empty inventory).
pub fn scan(dir: &Path) -> std::io::Result<Inventory> {
    let mut inv = Inventory::default();
    let mut seen: BTreeMap<(String, String), BTreeSet<(u64, u64)>> = BTreeMap::new();
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    for path in files {
        let bytes = std::fs::metadata(&path)?.len();
        let mut lines = 0;
        let mut highest_in_file: BTreeMap<(String, String), u64> = BTreeMap::new();
        for line in BufReader::new(std::fs::File::open(&path)?).lines() {
            let line = line?;
            lines += 1;
            let v: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(_) => {
                    inv.unparsable += 1;
                    continue;
                }
            };
            let epoch = v.get("epoch").and_then(|e| e.as_u64()).unwrap_or(0);
            let (Some(agent), Some(stream), Some(seq)) = (
                v.get("agent").and_then(|a| a.as_str()),
                v.get("stream").and_then(|s| s.as_str()),
                v.get("seq").and_then(|s| s.as_u64()),
            ) else {
                inv.unparsable += 1;
                continue;
            };
            let key = (agent.to_string(), stream.to_string());
            let summary = inv.streams.entry(key.clone()).or_default();
            let set = seen.entry(key.clone()).or_default();
            if summary.records == 0 {
                summary.first_seq = seq;
                summary.last_seq = seq;
            }
            summary.records += 1;
            summary.first_seq = summary.first_seq.min(seq);
            summary.last_seq = summary.last_seq.max(seq);
            if !set.insert((epoch, seq)) {
                summary.duplicates += 1;
                continue;
            }
            let highest = highest_in_file.entry(key).or_insert(seq);
            if seq < *highest {
                summary.out_of_order += 1;
            }
            *highest = (*highest).max(seq);
        }
        inv.files.push((path, lines, bytes));
    }
    for (key, summary) in inv.streams.iter_mut() {
        let distinct = seen
            .get(key)
            .map(|s| {
                s.iter()
                    .map(|(_, seq)| *seq)
                    .collect::<BTreeSet<u64>>()
                    .len() as u64
            })
            .unwrap_or(0);
        summary.missing = (summary.last_seq - summary.first_seq + 1) - distinct;
    }
    Ok(inv)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_gaps_duplicates_and_reordering() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        let line =
            |a: &str, s: u64| format!("{{\"agent\":\"{a}\",\"stream\":\"m\",\"seq\":{s}}}\n");
        let text: String = [
            line("a", 1),
            line("a", 2),
            line("a", 2),
            line("a", 5),
            line("a", 4),
            line("a", 2),
            line("b", 1),
        ]
        .concat();
        std::fs::write(dir.path().join("x/f.jsonl"), text + "garbage\n").unwrap();
        let inv = scan(dir.path()).unwrap();
        assert_eq!(inv.files.len(), 1);
        assert_eq!(inv.files[0].1, 8);
        assert_eq!(inv.unparsable, 1);
        let a = &inv.streams[&("a".to_string(), "m".to_string())];
        assert_eq!((a.records, a.first_seq, a.last_seq), (6, 1, 5));
        // 2 twice more (duplicates), 3 never, 4 first seen after 5
        assert_eq!((a.duplicates, a.missing, a.out_of_order), (2, 1, 1));
        assert!(!a.is_contiguous());
        assert!(inv.streams[&("b".to_string(), "m".to_string())].is_contiguous());
    }
}
