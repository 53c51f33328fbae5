//! `[checks.NAME]` (one check each) and `[check_runner]` (what all checks share) in the
//! agent configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use fleetbus_protocol::range::Range;

use super::builtin::{
    Builtin, DiskCheck, HttpCheck, LoadCheck, ProcessCheck, TcpCheck, UsageCheck,
};
use super::tracker::Policy;

/// `[checks.NAME]`: one check, run by the agent at its interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// The plugin and its arguments (each element one argument: no shell). Empty: a
    /// passive check, whose results are submitted (`fleetbus agent submit`).
    #[serde(default)]
    pub command: Vec<String>,
    /// Time between runs while the check is OK (and while a problem is HARD). Each check
    /// runs at a fixed phase within its interval, from a hash of the agent id and the check
    /// name: a fleet spreads evenly and a restart keeps the phase.
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    /// Time between runs while a problem is SOFT (confirming it); the interval when unset.
    #[serde(with = "humantime_serde", default)]
    pub retry_interval: Option<Duration>,
    /// Most time one run may take. Past it, the plugin's process group gets SIGTERM, then
    /// SIGKILL after `check_runner.kill_grace`, and the result is UNKNOWN.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// Non-OK results in a row that make a problem HARD (and raise an event).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Bytes of stdout, and of stderr, kept from one run; beyond, a marker says how much
    /// was cut.
    #[serde(default = "default_output_limit")]
    pub output_limit: usize,
    /// Flapping stops below this percent state change (over the last 21 results).
    #[serde(default = "default_flap_low")]
    pub flap_low: f64,
    /// Flapping starts at or above this percent state change.
    #[serde(default = "default_flap_high")]
    pub flap_high: f64,
    /// The group the check's events belong to (an application or team), for the console.
    #[serde(default)]
    pub group: Option<String>,
    /// A passive check that hears nothing for this long gets an UNKNOWN result (and
    /// another after each further period of silence).
    #[serde(with = "humantime_serde", default)]
    pub freshness: Option<Duration>,
    /// A built-in's warning range (each built-in has its own default).
    #[serde(default)]
    pub warn: Option<Range>,
    /// A built-in's critical range.
    #[serde(default)]
    pub crit: Option<Range>,
    /// Built-in: used space per mount.
    #[serde(default)]
    pub disk: Option<DiskCheck>,
    /// Built-in: load averages.
    #[serde(default)]
    pub load: Option<LoadCheck>,
    /// Built-in: used memory.
    #[serde(default)]
    pub memory: Option<UsageCheck>,
    /// Built-in: used swap.
    #[serde(default)]
    pub swap: Option<UsageCheck>,
    /// Built-in: processes of a name.
    #[serde(default)]
    pub process: Option<ProcessCheck>,
    /// Built-in: a TCP port accepting connections.
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    /// Built-in: an HTTP URL's status and time.
    #[serde(default)]
    pub http: Option<HttpCheck>,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_attempts() -> u32 {
    3
}
fn default_output_limit() -> usize {
    8 * 1024
}
fn default_flap_low() -> f64 {
    5.0
}
fn default_flap_high() -> f64 {
    20.0
}

impl CheckConfig {
    /// A check running `command` every `interval`, everything else the defaults.
    pub fn new(command: &[&str], interval: Duration) -> CheckConfig {
        CheckConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            interval,
            retry_interval: None,
            timeout: default_timeout(),
            max_attempts: default_max_attempts(),
            output_limit: default_output_limit(),
            flap_low: default_flap_low(),
            flap_high: default_flap_high(),
            group: None,
            freshness: None,
            warn: None,
            crit: None,
            disk: None,
            load: None,
            memory: None,
            swap: None,
            process: None,
            tcp: None,
            http: None,
        }
    }

    /// A passive check (results are submitted), UNKNOWN after `freshness` of silence.
    pub fn passive(freshness: Option<Duration>) -> CheckConfig {
        CheckConfig {
            freshness,
            ..CheckConfig::new(&[], default_interval())
        }
    }

    /// Whether the check's results are submitted rather than run (no command, no
    /// built-in).
    pub fn is_passive(&self) -> bool {
        self.command.is_empty() && Builtin::of(self).is_none()
    }

    /// How its results become states and events.
    pub fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            flap_low: self.flap_low,
            flap_high: self.flap_high,
        }
    }

    /// The values serde cannot check, keys relative to the check.
    pub(crate) fn check(&self, p: &mut fleetbus_config::Problems) {
        let builtins = Builtin::all_of(self);
        p.require(
            builtins.len() + usize::from(!self.command.is_empty()) <= 1,
            "command",
            "a check has one of command, disk, load, memory, swap, process, tcp, http",
        );
        for b in &builtins {
            b.check(p);
        }
        p.require(
            (self.warn.is_none() && self.crit.is_none()) || !builtins.is_empty(),
            "warn",
            "warn and crit are a built-in's thresholds (a plugin takes its own in `command`)",
        );
        p.require(
            self.freshness.is_none() || self.is_passive(),
            "freshness",
            "applies to a passive check (one without `command`)",
        );
        p.require(
            self.freshness.is_none_or(|f| f >= Duration::from_secs(1)),
            "freshness",
            "must be at least 1s",
        );
        p.require(
            self.interval >= Duration::from_secs(1),
            "interval",
            "must be at least 1s",
        );
        p.require(
            self.retry_interval
                .is_none_or(|r| r >= Duration::from_secs(1)),
            "retry_interval",
            "must be at least 1s",
        );
        p.require(
            self.timeout >= Duration::from_millis(10),
            "timeout",
            "must be at least 10ms",
        );
        p.require(
            (1..=100).contains(&self.max_attempts),
            "max_attempts",
            "must be between 1 and 100",
        );
        p.require(
            (256..=1024 * 1024).contains(&self.output_limit),
            "output_limit",
            "must be between 256 bytes and 1 MiB",
        );
        p.require(
            (0.0..=100.0).contains(&self.flap_low) && (0.0..=100.0).contains(&self.flap_high),
            "flap_low",
            "flap_low and flap_high are percents (0 to 100)",
        );
        p.require(
            self.flap_low <= self.flap_high,
            "flap_low",
            "must not be above flap_high",
        );
        if let Some(group) = &self.group {
            if let Err(e) = fleetbus_protocol::validate_id("group", group) {
                p.add("group", e.to_string());
            }
        }
    }
}

/// `[check_runner]`: what all checks share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckRunnerConfig {
    /// Plugins running at the same time, at most. A check due while all slots are taken
    /// waits for one; runs it misses meanwhile are skipped and counted, never stacked.
    pub concurrency: usize,
    /// How long a timed-out plugin's processes get between SIGTERM and SIGKILL.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// How often the agent looks for submitted results (`state_dir/checks/submitted/`).
    #[serde(with = "humantime_serde")]
    pub submit_poll: Duration,
}

impl Default for CheckRunnerConfig {
    fn default() -> Self {
        CheckRunnerConfig {
            concurrency: 4,
            kill_grace: Duration::from_secs(5),
            submit_poll: Duration::from_secs(1),
        }
    }
}

impl CheckRunnerConfig {
    /// The values serde cannot check, keys relative to `[check_runner]`.
    pub(crate) fn check(&self, p: &mut fleetbus_config::Problems) {
        p.require(
            (1..=256).contains(&self.concurrency),
            "concurrency",
            "must be between 1 and 256",
        );
        p.require(
            self.kill_grace <= Duration::from_secs(300),
            "kill_grace",
            "must be at most 5m",
        );
        p.require(
            (Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&self.submit_poll),
            "submit_poll",
            "must be between 10ms and 1h",
        );
    }
}
