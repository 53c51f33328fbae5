//! De-duplication state: for every (agent, stream), the outbox incarnation (epoch) and the
//! set of sequence numbers already accepted, kept as ranges (normally a single one).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{RecordKey, WalError};

/// Most ranges kept per stream. Gaps come from records refused under backpressure (sent
/// again later, when they fill) and from records the agent dropped (outbox overflow,
/// never filled). Beyond this many ranges the *lowest range is forgotten*: its numbers
/// count as unseen again, so a re-sent record from it would be stored a second time. A gap
/// is never closed: a number that was not received is never taken for a duplicate (that
/// would acknowledge a record nobody stored).
const MAX_RANGES: usize = 256;

/// A set of u64 as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// True when `v` is in the set.
    pub fn contains(&self, v: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, hi)| hi < v);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= v)
    }

    /// Adds `v`; returns false if it was already there.
    pub fn insert(&mut self, v: u64) -> bool {
        // fast path: the next number after the highest
        if let Some(last) = self.ranges.last_mut() {
            if last.1.checked_add(1) == Some(v) {
                last.1 = v;
                return true;
            }
            if last.1 < v {
                self.ranges.push((v, v));
                self.compact();
                return true;
            }
        }
        if self.contains(v) {
            return false;
        }
        self.insert_range(v, v);
        true
    }

    /// Adds every number of `[lo, hi]`.
    pub fn insert_range(&mut self, lo: u64, hi: u64) {
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        let mut merged = (lo, hi);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.ranges {
            if b.saturating_add(1) < merged.0 {
                out.push((a, b));
            } else if merged.1.saturating_add(1) < a {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((a, b));
            } else {
                merged = (merged.0.min(a), merged.1.max(b));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.ranges = out;
        self.compact();
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Forgets the lowest ranges beyond [`MAX_RANGES`] (see there): forgetting may let a
    /// duplicate through, merging would invent "seen" numbers.
    fn compact(&mut self) {
        if self.ranges.len() > MAX_RANGES {
            let excess = self.ranges.len() - MAX_RANGES;
            self.ranges.drain(..excess);
        }
    }
}

/// (agent, stream)
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamKey {
    /// The agent.
    pub agent: String,
    /// The stream.
    pub stream: String,
}

/// Epochs remembered per stream: an agent whose outbox started a new epoch may still
/// re-send records of the previous ones.
const MAX_EPOCHS: usize = 4;

/// The seen sequence numbers of a stream, per epoch (newest last).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StreamState {
    epochs: Vec<(u64, RangeSet)>,
    /// When the stream's last record was received (ms since the epoch); 0 when unknown
    /// (a snapshot from before this was kept).
    #[serde(default)]
    last_ms: i64,
}

/// How much one agent can make the de-duplication state remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLimits {
    /// Most streams remembered per agent: a record of one more makes the agent's least
    /// recently used stream forgotten.
    pub max_streams_per_agent: usize,
    /// A stream with no record for this long is forgotten (ms).
    pub idle_ms: i64,
}

impl Default for DedupLimits {
    fn default() -> Self {
        DedupLimits {
            max_streams_per_agent: 1024,
            idle_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    upto: u64,
    streams: Vec<(StreamKey, StreamState)>,
}

/// Which records were accepted, per (agent, stream).
///
/// Bounded: at most [`DedupLimits::max_streams_per_agent`] streams per agent (the least
/// recently used is forgotten for a new one) and streams idle for
/// [`DedupLimits::idle_ms`] are forgotten ([`Dedup::forget_idle`]). Forgetting a stream
/// means a record of it re-sent later is stored again (a possible duplicate), never that a
/// record is taken for one.
#[derive(Debug, Clone, Default)]
pub struct Dedup {
    agents: HashMap<String, HashMap<String, StreamState>>,
    limits: DedupLimits,
    /// Streams forgotten so far (by either bound).
    forgotten: u64,
    /// Changed since [`Dedup::mark_saved`].
    dirty: bool,
}

impl Dedup {
    /// True when `key` was accepted before (same epoch, seq already seen).
    pub fn is_duplicate(&self, key: &RecordKey) -> bool {
        self.agents
            .get(&key.agent)
            .and_then(|s| s.get(&key.stream))
            .and_then(|st| st.epochs.iter().find(|(e, _)| *e == key.epoch))
            .is_some_and(|(_, seen)| seen.contains(key.seq))
    }

    /// The same state with `limits` applied from now on.
    pub fn with_limits(mut self, limits: DedupLimits) -> Dedup {
        self.limits = limits;
        self
    }

    /// Streams forgotten so far (too many per agent, or idle).
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// True when something changed since the last [`Dedup::mark_saved`].
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Notes that the state as it is now was saved.
    pub fn mark_saved(&mut self) {
        self.dirty = false;
    }

    /// Notes that the state must be saved again (a save failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Forgets every stream with no record since `now_ms - limits.idle_ms`; returns how
    /// many.
    pub fn forget_idle(&mut self, now_ms: i64) -> usize {
        let cutoff = now_ms.saturating_sub(self.limits.idle_ms);
        let mut n = 0;
        self.agents.retain(|_, streams| {
            let before = streams.len();
            streams.retain(|_, st| st.last_ms == 0 || st.last_ms >= cutoff);
            n += before - streams.len();
            !streams.is_empty()
        });
        if n > 0 {
            self.forgotten += n as u64;
            self.dirty = true;
        }
        n
    }

    /// Records `key` as accepted, received at `at_ms`. A new epoch (the agent's outbox
    /// started again) gets a set of its own; the oldest of more than four is forgotten. A
    /// new stream beyond the agent's limit makes its least recently used stream forgotten.
    pub fn record(&mut self, key: &RecordKey, at_ms: i64) {
        self.dirty = true;
        let max_streams = self.limits.max_streams_per_agent.max(1);
        let streams = self.agents.entry(key.agent.clone()).or_default();
        if !streams.contains_key(&key.stream) && streams.len() >= max_streams {
            if let Some(oldest) = streams
                .iter()
                .min_by_key(|(_, st)| st.last_ms)
                .map(|(name, _)| name.clone())
            {
                streams.remove(&oldest);
                self.forgotten += 1;
            }
        }
        let st = match streams.get_mut(&key.stream) {
            Some(st) => st,
            None => streams.entry(key.stream.clone()).or_default(),
        };
        st.last_ms = st.last_ms.max(at_ms);
        match st.epochs.iter_mut().find(|(e, _)| *e == key.epoch) {
            Some((_, seen)) => {
                seen.insert(key.seq);
            }
            None => {
                if !st.epochs.is_empty() {
                    tracing::info!(agent = %key.agent, stream = %key.stream, epoch = key.epoch, "agent outbox started a new epoch: its sequence numbers may restart");
                }
                let mut seen = RangeSet::default();
                seen.insert(key.seq);
                st.epochs.push((key.epoch, seen));
                if st.epochs.len() > MAX_EPOCHS {
                    st.epochs.remove(0);
                }
            }
        }
    }

    /// Number of (agent, stream) pairs known.
    pub fn streams(&self) -> usize {
        self.agents.values().map(HashMap::len).sum()
    }

    /// Writes the state, valid for the WAL up to index `upto` (exclusive), atomically.
    pub fn save(&self, path: &Path, upto: u64) -> Result<(), WalError> {
        let snapshot = Snapshot {
            upto,
            streams: self
                .agents
                .iter()
                .flat_map(|(agent, streams)| {
                    streams.iter().map(|(stream, st)| {
                        (
                            StreamKey {
                                agent: agent.clone(),
                                stream: stream.clone(),
                            },
                            st.clone(),
                        )
                    })
                })
                .collect(),
        };
        let err = |problem: String| WalError::State {
            path: path.to_path_buf(),
            problem,
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(|e| err(e.to_string()))?;
        fleetbus_support::replace_file(path, &bytes).map_err(|e| err(format!("cannot save: {e}")))
    }

    /// Loads a snapshot; returns the state and the WAL index it covers (0 when there is no
    /// snapshot yet).
    pub fn load(path: &Path) -> Result<(Dedup, u64), WalError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Dedup::default(), 0)),
            Err(e) => {
                return Err(WalError::State {
                    path: path.to_path_buf(),
                    problem: format!("cannot read: {e}"),
                })
            }
        };
        let snapshot: Snapshot = serde_json::from_slice(&bytes).map_err(|e| WalError::State {
            path: path.to_path_buf(),
            problem: format!("unreadable de-duplication snapshot: {e}"),
        })?;
        let mut dedup = Dedup::default();
        for (key, st) in snapshot.streams {
            dedup
                .agents
                .entry(key.agent)
                .or_default()
                .insert(key.stream, st);
        }
        Ok((dedup, snapshot.upto))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64, epoch: u64) -> RecordKey {
        RecordKey {
            agent: "a".into(),
            stream: "s".into(),
            epoch,
            seq,
        }
    }

    #[test]
    fn range_set_merges_and_finds() {
        let mut r = RangeSet::default();
        for v in [1, 2, 3, 7, 5, 6, 10] {
            assert!(r.insert(v));
        }
        assert!(!r.insert(6));
        assert_eq!(r.ranges(), &[(1, 3), (5, 7), (10, 10)]);
        r.insert_range(4, 4);
        assert_eq!(r.ranges(), &[(1, 7), (10, 10)]);
        assert!(r.contains(7) && !r.contains(8) && r.contains(10) && !r.contains(0));
    }

    #[test]
    fn range_set_stays_bounded() {
        let mut r = RangeSet::default();
        for v in 0..1000 {
            r.insert(v * 2);
        }
        assert!(r.ranges().len() <= MAX_RANGES);
        assert!(r.contains(1998));
    }

    /// Hundreds of gaps (records refused under backpressure, later ones accepted): no
    /// number that was never inserted is ever reported as contained, however the set is
    /// compacted; only the oldest seen numbers may be forgotten.
    #[test]
    fn compaction_forgets_but_never_invents() {
        let mut r = RangeSet::default();
        for v in (1..=2000).step_by(2) {
            r.insert(v);
        }
        for gap in (2..=2000).step_by(2) {
            assert!(!r.contains(gap), "{gap} was never received");
        }
        assert!(r.ranges().len() <= MAX_RANGES);
        // the newest are remembered, the oldest forgotten
        assert!(r.contains(1999) && !r.contains(1));
        // filling the gaps later: every one is new
        for gap in (2..=2000).step_by(2) {
            assert!(r.insert(gap), "{gap} taken for a duplicate");
        }
        // random insertions against a model: contains() implies inserted
        use std::collections::HashSet;
        let mut seen = HashSet::new();
        let mut r = RangeSet::default();
        let mut x: u64 = 7;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (x >> 33) % 5000;
            r.insert(v);
            seen.insert(v);
            if x.is_multiple_of(7) {
                r.insert_range(v, v + (x >> 60));
                for w in v..=v + (x >> 60) {
                    seen.insert(w);
                }
            }
        }
        for v in 0..5100 {
            assert!(!r.contains(v) || seen.contains(&v), "{v} invented");
        }
    }

    #[test]
    fn duplicates_and_new_epochs() {
        let mut d = Dedup::default();
        assert!(!d.is_duplicate(&key(1, 9)));
        d.record(&key(1, 9), 0);
        d.record(&key(2, 9), 0);
        assert!(d.is_duplicate(&key(2, 9)));
        // the agent's outbox was wiped: seq 1 again, new epoch, not a duplicate
        assert!(!d.is_duplicate(&key(1, 10)));
        d.record(&key(1, 10), 0);
        assert!(d.is_duplicate(&key(1, 10)));
        assert!(!d.is_duplicate(&key(2, 10)));
        // re-sent records of the previous epoch are still recognised
        assert!(d.is_duplicate(&key(2, 9)));
        for e in 11..=14 {
            d.record(&key(1, e), 0);
        }
        assert!(
            !d.is_duplicate(&key(2, 9)),
            "only the last four epochs are kept"
        );
    }

    /// One agent inventing streams cannot grow the state without bound, and streams that
    /// went quiet are forgotten; what is kept still recognises duplicates.
    #[test]
    fn streams_are_bounded_per_agent_and_forgotten_when_idle() {
        let mut d = Dedup::default().with_limits(DedupLimits {
            max_streams_per_agent: 100,
            idle_ms: 1_000,
        });
        let k = |agent: &str, stream: String| RecordKey {
            agent: agent.into(),
            stream,
            epoch: 1,
            seq: 1,
        };
        for i in 0..10_000 {
            d.record(&k("rogue", format!("s{i}")), i);
        }
        d.record(&k("honest", "metrics".into()), 9_000);
        assert_eq!(d.streams(), 101);
        assert_eq!(d.forgotten(), 9_900);
        // the most recent of the rogue's are kept, the honest agent's too
        assert!(d.is_duplicate(&k("rogue", "s9999".into())));
        assert!(!d.is_duplicate(&k("rogue", "s0".into())));
        assert!(d.is_duplicate(&k("honest", "metrics".into())));
        // streams quiet for longer than a second are forgotten
        assert_eq!(d.forget_idle(10_950), 50 + 1);
        assert!(!d.is_duplicate(&k("honest", "metrics".into())));
        assert!(d.is_duplicate(&k("rogue", "s9999".into())));
        assert_eq!(d.forget_idle(20_000), 50);
        assert_eq!(d.streams(), 0);
    }

    #[test]
    fn snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup.json");
        assert_eq!(Dedup::load(&path).unwrap().1, 0);
        let mut d = Dedup::default();
        d.record(&key(5, 1), 0);
        d.save(&path, 42).unwrap();
        let (d2, upto) = Dedup::load(&path).unwrap();
        assert_eq!(upto, 42);
        assert!(d2.is_duplicate(&key(5, 1)));
        assert_eq!(d2.streams(), 1);
    }
}
