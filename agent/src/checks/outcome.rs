//! What one run of a plugin says: its state (from the exit), its text and long text, its
//! performance data as metrics, and why, when the plugin did not say (an exit outside 0-3,
//! a signal, a timeout, a start failure).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use fleetbus_protocol::check::CheckState;
use fleetbus_protocol::Metric;

use super::passive::Submission;
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
    /// How long the run took (zero for a submission).
    pub duration: Duration,
    /// The result was submitted, not run.
    pub passive: bool,
    /// When the result was made, if not now (a submission's time).
    pub at: Option<DateTime<Utc>>,
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
            passive: false,
            at: None,
        }
    }

    /// The outcome of a submission, its output cut to `limit` bytes.
    pub(crate) fn of_submission(submission: &Submission, limit: usize) -> Outcome {
        let mut output = submission.output.as_str();
        let mut stderr = String::new();
        if output.len() > limit {
            let mut end = limit;
            while !output.is_char_boundary(end) {
                end -= 1;
            }
            stderr = format!(
                "[... {} more bytes of the submitted output cut: the output limit]",
                output.len() - end
            );
            output = &output[..end];
        }
        let parsed = plugin_output::parse(output);
        let mut notes: Vec<String> = stderr.is_empty().then(Vec::new).unwrap_or(vec![stderr]);
        for problem in &parsed.problems {
            notes.push(format!("[performance data dropped: {problem}]"));
        }
        Outcome {
            state: submission.status,
            output: parsed.text,
            long_output: parsed.long_text,
            reason: None,
            stderr: notes.join("\n"),
            perfdata: parsed.perfdata,
            duration: Duration::ZERO,
            passive: true,
            at: Some(submission.ts),
        }
    }

    /// The UNKNOWN outcome of a passive check that heard nothing for `freshness`.
    pub(crate) fn stale(freshness: Duration) -> Outcome {
        Outcome {
            state: CheckState::Unknown,
            output: String::new(),
            long_output: String::new(),
            reason: Some(format!(
                "no result submitted for {}: the result is stale",
                humantime::format_duration(freshness)
            )),
            stderr: String::new(),
            perfdata: Vec::new(),
            duration: Duration::ZERO,
            passive: true,
            at: None,
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
