//! What one run of a plugin says: its state (from the exit), its text and long text, its
//! performance data as metrics, and why, when the plugin did not say (an exit outside 0-3,
//! a signal, a timeout, a start failure).

use std::collections::BTreeMap;
use std::time::Duration;

use fleetbus_protocol::check::CheckState;
use fleetbus_protocol::Metric;

use super::plugin_output::{self, PerfDatum};
use crate::process::exec::{End, Finished};

/// One result before it is tracked: what a run (or a submission) says.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The state.
    pub state: CheckState,
    /// The first line of the output.
    pub output: String,
    /// The long output.
    pub long_output: String,
    /// Why the state is what it is, when the plugin did not say.
    pub reason: Option<String>,
    /// Standard error, what was cut, and performance data that could not be read.
    pub stderr: String,
    /// The performance data.
    pub perfdata: Vec<PerfDatum>,
    /// How long the run took.
    pub duration: Duration,
}

impl Outcome {
    /// The outcome of a finished run of a plugin with `timeout`.
    pub(crate) fn of_run(done: &Finished, timeout: Duration, grace: Duration) -> Outcome {
        let (state, reason) = match &done.end {
            End::Exited(code) => CheckState::of_exit(Some(*code), None),
            End::Signalled(signal) => CheckState::of_exit(None, Some(*signal)),
            End::TimedOut => (
                CheckState::Unknown,
                Some(format!(
                    "timed out after {timeout:?}: its processes were sent SIGTERM, then SIGKILL after {grace:?}"
                )),
            ),
            End::NotStarted(why) => (CheckState::Unknown, Some(why.clone())),
        };
        let parsed = plugin_output::parse(&String::from_utf8_lossy(&done.stdout.kept));
        let mut notes = Vec::new();
        if !done.stderr.kept.is_empty() || done.stderr.cut > 0 {
            notes.push(done.stderr.text("stderr"));
        }
        if done.stdout.cut > 0 {
            notes.push(format!(
                "[... {} more bytes of stdout cut: the output limit]",
                done.stdout.cut
            ));
        }
        for problem in &parsed.problems {
            notes.push(format!("[performance data dropped: {problem}]"));
        }
        if done.left_behind > 0 {
            notes.push(format!(
                "[{} process(es) the plugin left running were ended]",
                done.left_behind
            ));
        }
        Outcome {
            state,
            output: parsed.text,
            long_output: parsed.long_text,
            reason,
            stderr: notes.join("\n"),
            perfdata: parsed.perfdata,
            duration: done.elapsed,
        }
    }

    /// The performance data as metrics, each labelled with the check's name.
    pub fn metrics(&self, check: &str) -> Vec<Metric> {
        self.perfdata
            .iter()
            .map(|d| Metric {
                name: d.label.clone(),
                value: d.value,
                unit: (!d.unit.is_empty()).then(|| d.unit.clone()),
                warn: d.warn,
                crit: d.crit,
                min: d.min,
                max: d.max,
                labels: BTreeMap::from([("check".to_string(), check.to_string())]),
            })
            .collect()
    }
}
