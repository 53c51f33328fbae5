//! Check results: what an agent publishes on stream `checks` for every run of a check, and
//! on stream `events` when a check's HARD state changes or it starts or stops flapping.
//!
//! A check's state comes from its plugin's exit: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN,
//! and anything else UNKNOWN with the reason kept (Telegraf reported exit 127 as state
//! 127, influxdata/telegraf#11061). On the wire a state is its number (`status`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::record::Severity;

/// The four states of a check; on the wire its number, 0 to 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum CheckState {
    /// 0: all is well.
    Ok,
    /// 1: above a warning threshold.
    Warning,
    /// 2: above a critical threshold, or down.
    Critical,
    /// 3: the check could not tell (and every exit that is not 0-3).
    Unknown,
}

impl CheckState {
    /// The state of a plugin that exited with `code`, or was killed by `signal`; for an
    /// exit outside 0-3, UNKNOWN and why.
    pub fn of_exit(code: Option<i32>, signal: Option<i32>) -> (CheckState, Option<String>) {
        match (code, signal) {
            (Some(0), _) => (CheckState::Ok, None),
            (Some(1), _) => (CheckState::Warning, None),
            (Some(2), _) => (CheckState::Critical, None),
            (Some(3), _) => (CheckState::Unknown, None),
            (Some(126), _) => (
                CheckState::Unknown,
                Some("exit 126: the plugin is not executable".into()),
            ),
            (Some(127), _) => (
                CheckState::Unknown,
                Some("exit 127: the plugin (or its interpreter) was not found".into()),
            ),
            (Some(n), _) => (
                CheckState::Unknown,
                Some(format!("exit {n}: not a plugin state (0-3)")),
            ),
            (None, Some(s)) => (CheckState::Unknown, Some(format!("killed by signal {s}"))),
            (None, None) => (CheckState::Unknown, Some("no exit status".into())),
        }
    }

    /// The state's number (0-3), as plugins and the records give it.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The state of a number 0-3.
    pub fn of_code(code: u8) -> Option<CheckState> {
        [
            CheckState::Ok,
            CheckState::Warning,
            CheckState::Critical,
            CheckState::Unknown,
        ]
        .get(usize::from(code))
        .copied()
    }
}

impl TryFrom<u8> for CheckState {
    type Error = String;
    fn try_from(code: u8) -> Result<Self, Self::Error> {
        CheckState::of_code(code).ok_or_else(|| format!("check status must be 0 to 3, got {code}"))
    }
}

impl From<CheckState> for u8 {
    fn from(s: CheckState) -> u8 {
        s.code()
    }
}

impl CheckState {
    /// The severity of an event raised by a check entering this state: OK 1 (info),
    /// UNKNOWN 2 (notice), WARNING 3, CRITICAL 4 (major).
    pub fn severity(self) -> Severity {
        match self {
            CheckState::Ok => Severity::INFO,
            CheckState::Unknown => Severity::NOTICE,
            CheckState::Warning => Severity::WARNING,
            CheckState::Critical => Severity::MAJOR,
        }
    }
}

/// Whether a state is confirmed: a non-OK result is SOFT until it has been seen
/// `max_attempts` times in a row, then HARD. OK is always HARD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateType {
    /// Not yet confirmed: the check is retrying at its `retry_interval`.
    Soft,
    /// Confirmed.
    Hard,
}

/// One check result: the `check` field of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check's name (`[checks.NAME]` in the agent's configuration).
    pub name: String,
    /// Its state, 0 OK to 3 UNKNOWN.
    pub status: CheckState,
    /// SOFT or HARD.
    pub state_type: StateType,
    /// Which consecutive non-OK result this is (1 for an OK result), up to `max_attempts`.
    pub attempt: u32,
    /// How many non-OK results in a row make a state HARD.
    pub max_attempts: u32,
    /// The first line of the plugin's output (without its performance data).
    #[serde(default)]
    pub output: String,
    /// The plugin's long output (the lines after the first, without performance data).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub long_output: String,
    /// Why the state is what it is when the plugin did not say: an exit outside 0-3, a
    /// signal, a timeout, a start failure, a result that is no longer fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the plugin wrote to standard error (capped), or unreadable performance data.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
    /// How long the run took, in milliseconds (0 for a submitted result).
    #[serde(default)]
    pub duration_ms: u64,
    /// The result was submitted (`fleetbus agent submit`), not run by the agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passive: bool,
    /// The check is flapping (its state changes too often to notify on each change).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flapping: bool,
    /// The percent state change over the last 21 results (the flapping measure).
    #[serde(default)]
    pub state_change: f64,
    /// On an event record: the HARD state the check left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<CheckState>,
}

/// `OK`, `WARNING`, `CRITICAL`, `UNKNOWN`.
impl fmt::Display for CheckState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckState::Ok => "OK",
            CheckState::Warning => "WARNING",
            CheckState::Critical => "CRITICAL",
            CheckState::Unknown => "UNKNOWN",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_0_to_3_are_the_states_and_every_other_is_unknown_with_why() {
        for (code, state) in [
            (0, CheckState::Ok),
            (1, CheckState::Warning),
            (2, CheckState::Critical),
            (3, CheckState::Unknown),
        ] {
            assert_eq!(CheckState::of_exit(Some(code), None), (state, None));
            assert_eq!(CheckState::of_code(state.code()), Some(state));
        }
        for (code, signal, why) in [
            (Some(4), None, "exit 4: not a plugin state"),
            (Some(126), None, "not executable"),
            (Some(127), None, "not found"),
            (Some(255), None, "exit 255"),
            (Some(-1), None, "exit -1"),
            (None, Some(9), "killed by signal 9"),
            (None, None, "no exit status"),
        ] {
            let (state, reason) = CheckState::of_exit(code, signal);
            assert_eq!(state, CheckState::Unknown, "{code:?}");
            let reason = reason.unwrap();
            assert!(reason.contains(why), "{reason}");
        }
        assert_eq!(CheckState::of_code(4), None);
        assert_eq!(CheckState::Critical.to_string(), "CRITICAL");
    }

    #[test]
    fn a_state_is_its_number_on_the_wire_and_4_is_refused() {
        assert_eq!(serde_json::to_string(&CheckState::Critical).unwrap(), "2");
        assert_eq!(
            serde_json::from_str::<CheckState>("3").unwrap(),
            CheckState::Unknown
        );
        let e = serde_json::from_str::<CheckState>("4").unwrap_err();
        assert!(e.to_string().contains("0 to 3"), "{e}");
        assert_eq!(
            serde_json::to_string(&StateType::Soft).unwrap(),
            r#""soft""#
        );
    }
}
