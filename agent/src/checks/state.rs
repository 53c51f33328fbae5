//! A check's state from its plugin's exit: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, and
//! anything else UNKNOWN with the reason kept (Telegraf reported exit 127 as state 127,
//! influxdata/telegraf#11061).

use std::fmt;

/// The four states of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
}
