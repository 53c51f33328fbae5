//! What an accept loop does when `accept` fails.
//!
//! The usual cause is a process out of file descriptors (EMFILE/ENFILE): the pending
//! connection stays in the kernel's queue, so accepting again at once fails again at once.
//! A loop that just logs and retries spins a core and writes millions of log lines (seen: 5
//! million in 10 s, nothing ingested). Every accept loop of the server (MQTT, TLS, the
//! HTTP endpoints) backs off instead, from 10 ms doubling to 1 s, counts each pause
//! (`fleetbus_accept_backoffs_total`) and logs at most one line every 10 s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetbus_support::Throttle;

/// The first pause after a failed accept.
pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between accepts while they keep failing.
pub const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// One accept loop's back-off state.
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: &'static str,
    pause: Duration,
    throttle: Throttle,
}

impl AcceptBackoff {
    /// The back-off of the listener named `listener` (in log lines).
    pub fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            pause: FIRST_PAUSE,
            throttle: Throttle::new(Duration::from_secs(10)),
        }
    }

    /// `accept` failed with `error`: counts it in `counter`, logs it (bounded) and says how
    /// long to pause before accepting again (growing while failures go on).
    pub fn failed(&mut self, error: &std::io::Error, counter: &AtomicU64) -> Duration {
        counter.fetch_add(1, Ordering::Relaxed);
        let pause = self.pause;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
        if let Some(left_out) = self.throttle.admit() {
            let fds = matches!(error.raw_os_error(), Some(23 | 24));
            tracing::error!(
                listener = self.listener,
                %error,
                out_of_file_descriptors = fds,
                ?pause,
                similar_errors_not_logged = left_out,
                "accept failed; pausing before the next accept"
            );
        }
        pause
    }

    /// `failed`, then the pause itself.
    pub async fn pause_after(&mut self, error: &std::io::Error, counter: &AtomicU64) {
        let pause = self.failed(error, counter);
        tokio::time::sleep(pause).await;
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.pause = FIRST_PAUSE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_second_and_reset_on_success() {
        let counter = AtomicU64::new(0);
        let mut b = AcceptBackoff::new("test");
        let emfile = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..10).map(|_| b.failed(&emfile, &counter)).collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().unwrap(), LONGEST_PAUSE);
        assert_eq!(counter.load(Ordering::Relaxed), 10);
        b.succeeded();
        assert_eq!(b.failed(&emfile, &counter), FIRST_PAUSE);
    }
}
