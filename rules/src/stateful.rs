//! A rule's stateful operations, each keyed by a CEL expression:
//!
//! - `throttle = { key = "agent", rate = "10/1m" }`: at most 10 messages per key a minute
//!   pass (a token bucket: 10 may pass at once, then one every 6 s); the rest are counted
//!   as throttled.
//! - `dedupe = { key = "record.event.rule", window = "10m" }`: a message whose key passed
//!   less than 10 minutes ago is counted as a duplicate; so a message repeated without end
//!   passes once every 10 minutes.
//!
//! Time is the time the server received the message. The state is in memory, one table per
//! rule and operation, of at most `max_keys` keys (default 100,000, about 60 bytes each):
//! keys whose state is back to its start (a full bucket, a window gone by) are swept out
//! when the table is full, at most once a second; a new key that finds the table full
//! still is let through and counted as `untracked`, never stored, so that a flood of
//! distinct keys costs neither memory nor time. Keys are kept as 64-bit hashes.
//! docs/guarantees.md says what a restart and a reload do to the state.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use crate::transform::Expression;

/// The default bound on the keys one operation remembers.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// How often, at most, a full table is swept (by message time).
const SWEEP_EVERY_MS: i64 = 1_000;

/// `N/PERIOD`: N messages per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// Per how long.
    pub per: Duration,
}

impl Rate {
    /// Parses `10/1m`, `1/30s`, `100/1h` (a count of at least 1, a period of at least 1 ms
    /// as humantime writes it).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("`{text}` is not a rate: write COUNT/PERIOD, e.g. \"10/1m\"");
        let (count, per) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
        if count == 0 || per.as_millis() == 0 {
            return Err(format!(
                "`{text}`: the count and the period must be above zero"
            ));
        }
        Ok(Rate { count, per })
    }
}

/// What a stateful operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateKind {
    /// At most `rate` messages per key.
    Throttle(Rate),
    /// One message per key per window.
    Dedupe(Duration),
}

/// One stateful operation of a rule: its kind, its key and its bound.
#[derive(Debug)]
pub struct Gate {
    /// What it does.
    pub kind: GateKind,
    /// The key (`None`: one key for all the rule's messages).
    pub key: Option<Expression>,
    /// The most keys it remembers.
    pub max_keys: usize,
}

impl Gate {
    /// The configuration that decides whether state carries over a reload: the kind, the
    /// key's source and the bound.
    pub fn fingerprint(&self) -> String {
        format!(
            "{:?}|{}|{}",
            self.kind,
            self.key.as_ref().map(|k| k.source()).unwrap_or(""),
            self.max_keys
        )
    }
}

/// What a gate said of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It passes.
    Pass,
    /// It passes, and its key was not stored (the table is full).
    Untracked,
    /// Held back: throttled or a duplicate.
    Held,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Throttle: tokens left (scaled by the period in ms, so that arithmetic is exact);
    /// dedupe: unused.
    tokens: u64,
    /// When it was last updated (ms).
    at_ms: i64,
}

/// The state of one gate.
#[derive(Debug)]
pub struct GateState {
    hasher: RandomState,
    slots: HashMap<u64, Slot>,
    last_sweep_ms: i64,
}

impl Default for GateState {
    fn default() -> Self {
        GateState {
            hasher: RandomState::new(),
            slots: HashMap::new(),
            last_sweep_ms: i64::MIN,
        }
    }
}

impl GateState {
    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Decides for a message of `key` received at `now_ms`, and updates the state.
    pub fn admit(&mut self, gate: &Gate, key: &str, now_ms: i64) -> Verdict {
        let hash = self.hasher.hash_one(key);
        if !self.slots.contains_key(&hash) && self.slots.len() >= gate.max_keys {
            self.sweep(gate, now_ms);
            if self.slots.len() >= gate.max_keys {
                return Verdict::Untracked;
            }
        }
        match gate.kind {
            GateKind::Throttle(rate) => {
                // tokens in units of 1/per_ms of a message: `count * per_ms` is a full
                // bucket, one message costs `per_ms`, and each ms adds `count`
                let per_ms = rate.per.as_millis() as u64;
                let full = u64::from(rate.count) * per_ms;
                let slot = self.slots.entry(hash).or_insert(Slot {
                    tokens: full,
                    at_ms: now_ms,
                });
                let elapsed = now_ms.saturating_sub(slot.at_ms).max(0) as u64;
                slot.tokens = full.min(
                    slot.tokens
                        .saturating_add(elapsed.saturating_mul(u64::from(rate.count))),
                );
                slot.at_ms = slot.at_ms.max(now_ms);
                if slot.tokens >= per_ms {
                    slot.tokens -= per_ms;
                    Verdict::Pass
                } else {
                    Verdict::Held
                }
            }
            GateKind::Dedupe(window) => {
                let window_ms = window.as_millis() as i64;
                match self.slots.get_mut(&hash) {
                    Some(slot) if now_ms.saturating_sub(slot.at_ms) < window_ms => Verdict::Held,
                    Some(slot) => {
                        slot.at_ms = now_ms;
                        Verdict::Pass
                    }
                    None => {
                        self.slots.insert(
                            hash,
                            Slot {
                                tokens: 0,
                                at_ms: now_ms,
                            },
                        );
                        Verdict::Pass
                    }
                }
            }
        }
    }

    /// Drops the keys whose state is back to where a new key starts, at most once a second.
    fn sweep(&mut self, gate: &Gate, now_ms: i64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < SWEEP_EVERY_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        let idle_ms = match gate.kind {
            GateKind::Throttle(rate) => rate.per.as_millis() as i64,
            GateKind::Dedupe(window) => window.as_millis() as i64,
        };
        self.slots
            .retain(|_, slot| now_ms.saturating_sub(slot.at_ms) < idle_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(kind: GateKind, max_keys: usize) -> Gate {
        Gate {
            kind,
            key: None,
            max_keys,
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("10/1m").unwrap(),
            Rate {
                count: 10,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            Rate::parse(" 1 / 30s ").unwrap().per,
            Duration::from_secs(30)
        );
        for bad in [
            "10",
            "x/1m",
            "10/",
            "0/1m",
            "10/0s",
            "-1/1m",
            "10/fortnight",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_throttle_lets_the_burst_through_then_one_per_interval() {
        let g = gate(GateKind::Throttle(Rate::parse("10/1m").unwrap()), 100);
        let mut s = GateState::default();
        let passed = (0..25)
            .filter(|_| s.admit(&g, "a", 0) == Verdict::Pass)
            .count();
        assert_eq!(passed, 10);
        // another key has its own bucket
        assert_eq!(s.admit(&g, "b", 0), Verdict::Pass);
        // one more every 6 s
        assert_eq!(s.admit(&g, "a", 5_999), Verdict::Held);
        assert_eq!(s.admit(&g, "a", 6_000), Verdict::Pass);
        assert_eq!(s.admit(&g, "a", 6_001), Verdict::Held);
        // a full minute refills the bucket, never beyond
        let passed = (0..25)
            .filter(|_| s.admit(&g, "a", 600_000) == Verdict::Pass)
            .count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn dedupe_passes_a_key_once_per_window() {
        let g = gate(GateKind::Dedupe(Duration::from_secs(10)), 100);
        let mut s = GateState::default();
        assert_eq!(s.admit(&g, "disk", 0), Verdict::Pass);
        assert_eq!(s.admit(&g, "disk", 9_999), Verdict::Held);
        assert_eq!(s.admit(&g, "cpu", 9_999), Verdict::Pass);
        assert_eq!(s.admit(&g, "disk", 10_000), Verdict::Pass);
        assert_eq!(s.admit(&g, "disk", 10_001), Verdict::Held);
    }

    #[test]
    fn a_full_table_sweeps_idle_keys_and_lets_new_ones_through_untracked() {
        let g = gate(GateKind::Dedupe(Duration::from_secs(10)), 3);
        let mut s = GateState::default();
        for k in ["a", "b", "c"] {
            assert_eq!(s.admit(&g, k, 0), Verdict::Pass);
        }
        // full of live keys: a new key passes, is not stored, and is not held next time
        assert_eq!(s.admit(&g, "d", 1), Verdict::Untracked);
        assert_eq!(s.admit(&g, "d", 2), Verdict::Untracked);
        assert_eq!(s.len(), 3);
        // known keys still work
        assert_eq!(s.admit(&g, "a", 3), Verdict::Held);
        // once they are idle a sweep makes room
        assert_eq!(s.admit(&g, "e", 20_000), Verdict::Pass);
        assert_eq!(s.len(), 1);
    }
}
