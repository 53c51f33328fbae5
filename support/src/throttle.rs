//! Logging an error that repeats at a bounded rate.
//!
//! A loop that fails the same way over and over (accept on a process out of file
//! descriptors, saving a position on a full disk) must not turn into millions of log lines:
//! that fills the disk it is complaining about and hides everything else. A [`Throttle`]
//! lets the first occurrence through at once and then at most one per interval, and says
//! how many it left out in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Admits one log line per interval for one kind of repeated error.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle letting one line through per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were left out since the
    /// last one; `None` when this occurrence is to be left out (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit_at(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(t.admit_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.admit_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(t.admit_at(t0 + Duration::from_secs(11)), None);
    }
}
