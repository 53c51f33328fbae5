//! Built-in checks, so that an agent is useful without plugins: disk usage per mount,
//! load, memory, swap, a process present, a TCP port answering, an HTTP URL's status and
//! latency. Each gives what a plugin would: a state, a status text and performance data,
//! its thresholds (`warn`, `crit` of the check) in the same range syntax plugins use.

mod net;
mod system;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleetbus_protocol::check::CheckState;
use fleetbus_protocol::range::Range;
use serde::{Deserialize, Serialize};

use super::config::CheckConfig;
use super::outcome::Outcome;
use super::plugin_output::PerfDatum;

/// `disk = { mounts = [...] }`: used space per mount, in percent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskCheck {
    /// The mount points to check; none: every mounted file system.
    pub mounts: Vec<String>,
}

/// `load = { per_cpu = true }`: the 1, 5 and 15 minute load averages.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadCheck {
    /// Divide the load by the number of CPUs before comparing it with the thresholds.
    pub per_cpu: bool,
}

/// `memory = {}` or `swap = {}`: used memory (or swap) in percent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageCheck {}

/// `process = { name = "nginx" }`: how many processes have this exact name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessCheck {
    /// The process name (as `ps -o comm` shows it).
    pub name: String,
}

/// `tcp = { address = "db.internal:5432" }`: a TCP connection is accepted; its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    /// `host:port`.
    pub address: String,
}

/// `http = { url = "https://...", expect = [200] }`: a GET's status and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// The URL (`http://` or `https://`). Redirects are not followed.
    pub url: String,
    /// The statuses that are OK; none: any 2xx or 3xx.
    #[serde(default)]
    pub expect: Vec<u16>,
    /// CA certificates (PEM) the server's certificate must chain to; the system's when
    /// unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Which built-in a check is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Builtin<'a> {
    Disk(&'a DiskCheck),
    Load(&'a LoadCheck),
    Memory,
    Swap,
    Process(&'a ProcessCheck),
    Tcp(&'a TcpCheck),
    Http(&'a HttpCheck),
}

impl<'a> Builtin<'a> {
    /// Every built-in the check configures (a valid check has at most one).
    pub(crate) fn all_of(c: &'a CheckConfig) -> Vec<Builtin<'a>> {
        let mut out = Vec::new();
        out.extend(c.disk.as_ref().map(Builtin::Disk));
        out.extend(c.load.as_ref().map(Builtin::Load));
        out.extend(c.memory.as_ref().map(|_| Builtin::Memory));
        out.extend(c.swap.as_ref().map(|_| Builtin::Swap));
        out.extend(c.process.as_ref().map(Builtin::Process));
        out.extend(c.tcp.as_ref().map(Builtin::Tcp));
        out.extend(c.http.as_ref().map(Builtin::Http));
        out
    }

    /// The built-in the check is, if it is one.
    pub(crate) fn of(c: &'a CheckConfig) -> Option<Builtin<'a>> {
        Builtin::all_of(c).into_iter().next()
    }

    /// The name a status text starts with (`DISK OK - ...`).
    fn label(&self) -> &'static str {
        match self {
            Builtin::Disk(_) => "DISK",
            Builtin::Load(_) => "LOAD",
            Builtin::Memory => "MEMORY",
            Builtin::Swap => "SWAP",
            Builtin::Process(_) => "PROCS",
            Builtin::Tcp(_) => "TCP",
            Builtin::Http(_) => "HTTP",
        }
    }

    /// The thresholds when the check sets none: disk 80/90 % and memory 90/95 % used,
    /// swap 50/80 %, a process at least once; the others only measure.
    fn default_thresholds(&self) -> (Option<Range>, Option<Range>) {
        let r = |t: &str| Range::parse(t).ok();
        match self {
            Builtin::Disk(_) => (r("80"), r("90")),
            Builtin::Memory => (r("90"), r("95")),
            Builtin::Swap => (r("50"), r("80")),
            Builtin::Process(_) => (None, r("1:")),
            _ => (None, None),
        }
    }

    /// The problems of its settings, keys relative to the check.
    pub(crate) fn check(&self, p: &mut fleetbus_config::Problems) {
        match self {
            Builtin::Process(c) => p.require(!c.name.is_empty(), "process.name", "is empty"),
            Builtin::Tcp(c) => p.require(
                c.address
                    .rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()),
                "tcp.address",
                format!("`{}` is not host:port", c.address),
            ),
            Builtin::Http(c) => {
                if let Err(e) = crate::http_client::parse_url(&c.url) {
                    p.add("http.url", e);
                }
                p.require(
                    c.expect.iter().all(|s| (100..=599).contains(s)),
                    "http.expect",
                    "statuses are 100 to 599",
                );
                if let Some(ca) = &c.ca_file {
                    if let Err(e) = fleetbus_mqtt::read_certificates("http.ca_file", ca) {
                        p.add("http.ca_file", e.to_string());
                    }
                }
            }
            _ => {}
        }
    }
}

/// What a built-in measured: its text (after the label and state) and its values, each
/// compared with the thresholds when `judged`.
pub(crate) struct Measured {
    /// A state decided without thresholds (a refused connection, a missing mount).
    pub fixed: Option<CheckState>,
    /// What it says.
    pub text: String,
    /// The values, as performance data (thresholds filled in when judged).
    pub values: Vec<(PerfDatum, bool)>,
}

/// Runs built-in `builtin` of `config`, within its timeout: the outcome, and whether it
/// timed out.
pub(crate) async fn run(builtin: Builtin<'_>, config: &CheckConfig) -> (Outcome, bool) {
    let started = Instant::now();
    let measured = tokio::time::timeout(config.timeout, measure(builtin, config.timeout)).await;
    let (defaults_warn, defaults_crit) = builtin.default_thresholds();
    let warn = config.warn.or(defaults_warn);
    let crit = config.crit.or(defaults_crit);
    let mut outcome = Outcome {
        state: CheckState::Unknown,
        output: String::new(),
        long_output: String::new(),
        reason: None,
        stderr: String::new(),
        perfdata: Vec::new(),
        duration: Duration::ZERO,
        passive: false,
        at: None,
    };
    let timed_out = measured.is_err();
    match measured {
        Err(_) => {
            outcome.reason = Some(format!("timed out after {:?}", config.timeout));
            outcome.output = format!("{} UNKNOWN - timed out", builtin.label());
        }
        Ok(m) => {
            let mut state = CheckState::Ok;
            for (datum, judged) in m.values {
                let mut datum = datum;
                if judged {
                    datum.warn = warn;
                    datum.crit = crit;
                    if let Some(v) = datum.value {
                        if crit.is_some_and(|r| r.alerts(v)) {
                            state = worse(state, CheckState::Critical);
                        } else if warn.is_some_and(|r| r.alerts(v)) {
                            state = worse(state, CheckState::Warning);
                        }
                    }
                }
                outcome.perfdata.push(datum);
            }
            if let Some(fixed) = m.fixed {
                state = worse(state, fixed);
            }
            outcome.state = state;
            outcome.output = format!("{} {state} - {}", builtin.label(), m.text);
        }
    }
    outcome.duration = started.elapsed();
    (outcome, timed_out)
}

/// The worse of two states: CRITICAL over WARNING over UNKNOWN over OK (a value that
/// alerts says more than a failure to measure another one; nothing makes a failure OK).
fn worse(a: CheckState, b: CheckState) -> CheckState {
    let rank = |s: CheckState| match s {
        CheckState::Ok => 0,
        CheckState::Unknown => 1,
        CheckState::Warning => 2,
        CheckState::Critical => 3,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

async fn measure(builtin: Builtin<'_>, timeout: Duration) -> Measured {
    // a server that does not answer is the network built-ins' CRITICAL, said before the
    // check's own timeout (UNKNOWN) would cut them off
    let answer_within = timeout.mul_f64(0.9);
    match builtin {
        Builtin::Tcp(c) => net::tcp(c, answer_within).await,
        Builtin::Http(c) => net::http(c, answer_within).await,
        other => {
            // sysinfo reads /proc synchronously: off the async workers
            let owned = system::Owned::of(other);
            tokio::task::spawn_blocking(move || owned.measure())
                .await
                .unwrap_or_else(|e| Measured {
                    fixed: Some(CheckState::Unknown),
                    text: format!("the measurement failed: {e}"),
                    values: Vec::new(),
                })
        }
    }
}

/// A performance datum with a value, a unit and bounds.
pub(crate) fn datum(
    label: &str,
    value: f64,
    unit: &str,
    min: Option<f64>,
    max: Option<f64>,
) -> PerfDatum {
    PerfDatum {
        label: label.to_string(),
        value: Some(value),
        unit: unit.to_string(),
        warn: None,
        crit: None,
        min,
        max,
    }
}

#[cfg(test)]
mod tests;
