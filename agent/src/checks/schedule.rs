//! When a check runs: at a fixed phase within its interval, the phase taken from a hash of
//! the agent id and the check name. Agents started together do not run a check in step
//! (the phases of a fleet spread evenly over the interval), and a restarted agent keeps
//! its checks' phases, since the phase is counted from the UNIX epoch.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// The phase of check `name` of agent `agent` within `interval`.
pub fn phase(agent: &str, name: &str, interval: Duration) -> Duration {
    let digest = Sha256::new()
        .chain_update(agent.as_bytes())
        .chain_update([0])
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let nanos = interval.as_nanos().max(1);
    let offset = u128::from(u64::from_be_bytes(first)) % nanos;
    Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
}

/// How long from `now` until the next time the check is due: the first instant at or after
/// `now` that is `phase` past a multiple of `interval` since the UNIX epoch.
pub fn until_due(now: SystemTime, interval: Duration, phase: Duration) -> Duration {
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let interval = interval.as_nanos().max(1);
    let into = (since_epoch + interval - phase.as_nanos() % interval) % interval;
    let wait = if into == 0 { 0 } else { interval - into };
    Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_is_stable_and_spreads_a_fleet_over_the_interval() {
        let every = Duration::from_secs(60);
        assert_eq!(
            phase("web-01", "disk", every),
            phase("web-01", "disk", every)
        );
        assert_ne!(
            phase("web-01", "disk", every),
            phase("web-01", "load", every)
        );
        // 600 agents over 10 buckets of 6 s: none empty, none with more than twice its share
        let mut buckets = [0u32; 10];
        for n in 0..600 {
            let p = phase(&format!("agent-{n}"), "disk", every);
            assert!(p < every);
            buckets[(p.as_secs() / 6) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (20..=120).contains(&b)),
            "{buckets:?}"
        );
    }

    #[test]
    fn the_wait_lands_on_the_phase_of_the_interval() {
        let every = Duration::from_secs(60);
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let p = Duration::from_secs(15);
        assert_eq!(until_due(at(6000), every, p), Duration::from_secs(15));
        assert_eq!(until_due(at(6015), every, p), Duration::ZERO);
        assert_eq!(until_due(at(6016), every, p), Duration::from_secs(59));
        assert_eq!(
            until_due(at(6059), every, Duration::ZERO),
            Duration::from_secs(1)
        );
        // a restart at any time keeps the phase: now + wait is always 15 s past a minute
        for s in 6000..6200 {
            let due = 6000 + s - 6000 + until_due(at(s), every, p).as_secs();
            assert_eq!(due % 60, 15, "{s}");
        }
    }
}
