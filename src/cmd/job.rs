//! `fleetbus job ...`: push, follow, list and cancel jobs through a running server's admin
//! endpoint (`[admin] listen`, default 127.0.0.1:7070).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetbus_jobs::{JobReport, PushRequest, Rollout};
use fleetbus_protocol::{ExecutionState, JobTarget};

use super::admin_client::{AdminClient, AdminEndpoint};
use super::table::print_table;

/// `fleetbus job ...`
#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    admin: AdminEndpoint,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Push a job to one agent or to a group (as one task).
    Push(PushArgs),
    /// Per-target table of a job: state, started, finished, exit code, output head. Exits
    /// 1 when an execution failed, timed out, was rejected or cancelled.
    Status {
        /// The job id.
        id: String,
    },
    /// Recent jobs with counts per state.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Cancel a job: targets that have not started it never will.
    Cancel {
        /// The job id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct PushArgs {
    /// Target one agent.
    #[arg(long, conflicts_with = "group", required_unless_present = "group")]
    agent: Option<String>,
    /// Target every member of a group.
    #[arg(long)]
    group: Option<String>,
    /// The operation (a handler the agents allow-list).
    #[arg(long)]
    op: String,
    /// An argument, NAME=VALUE (repeatable).
    #[arg(long = "arg", value_parser = parse_arg)]
    args: Vec<(String, String)>,
    /// Most time one execution may take.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Send to at most this many targets per minute (default: all at once).
    #[arg(long)]
    rate: Option<u32>,
    /// Cancel the targets not started once this % of finished executions failed...
    #[arg(long)]
    abort_failure_pct: Option<f64>,
    /// ...and at least this many finished.
    #[arg(long, default_value_t = 1)]
    abort_min_finished: u32,
    /// Queue the job even if no known agent is a target (an agent never seen, a group with
    /// no known member): it waits for targets that connect later, until the server's
    /// `jobs.offline_expiry`.
    #[arg(long)]
    allow_empty: bool,
    /// Follow the job with a progress bar until every target finished or the wait
    /// deadline passed; exit 1 if any failed, 2 if some had not finished by the deadline.
    #[arg(long)]
    wait: bool,
    /// How long --wait follows the job (default: --timeout plus one minute, plus the time a
    /// --rate rollout needs to reach every target).
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    wait_timeout: Option<Duration>,
}

/// `job push --wait` exit codes beyond 0 (every execution succeeded).
const EXIT_FAILED: u8 = 1;
/// Some executions had not finished when `--wait` stopped at its deadline.
const EXIT_UNFINISHED: u8 = 2;

fn parse_arg(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))
}

/// Runs `fleetbus job ...`.
pub async fn run(args: JobArgs) -> anyhow::Result<ExitCode> {
    let client = args.admin.client()?;
    match args.command {
        JobCommand::Push(p) => push(&client, p).await,
        JobCommand::Status { id } => {
            let report: JobReport = client.get(&format!("/jobs/{id}")).await?;
            print_report(&report);
            Ok(match bad(&report) {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_FAILED),
            })
        }
        JobCommand::List { limit } => {
            let list: Vec<JobReport> = client.get(&format!("/jobs?limit={limit}")).await?;
            let rows: Vec<[String; 5]> = list
                .iter()
                .map(|r| {
                    [
                        r.job.doc.id.clone(),
                        r.job.doc.operation.clone(),
                        r.job.doc.target.to_string(),
                        format!("{:?}", r.job.state).to_lowercase(),
                        counts(r),
                    ]
                })
                .collect();
            print_table(["job", "operation", "target", "state", "counts"], &rows);
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel { id } => {
            let report: JobReport = client.post(&format!("/jobs/{id}/cancel"), &()).await?;
            println!("job {id}: {}", counts(&report));
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn push(client: &AdminClient, p: PushArgs) -> anyhow::Result<ExitCode> {
    let target = match (p.agent, p.group) {
        (Some(a), _) => JobTarget::Agent(a),
        (None, Some(g)) => JobTarget::Group(g),
        (None, None) => anyhow::bail!("--agent or --group is required"),
    };
    let req = PushRequest {
        target,
        operation: p.op,
        args: p.args.into_iter().collect::<BTreeMap<_, _>>(),
        timeout_secs: p.timeout.as_secs().max(1),
        rollout: Rollout {
            max_per_minute: p.rate,
            abort_failure_pct: p.abort_failure_pct,
            abort_min_finished: p.abort_min_finished,
        },
        allow_empty: p.allow_empty,
    };
    let report: JobReport = client.post("/jobs", &req).await?;
    let id = report.job.doc.id.clone();
    println!(
        "job {id}: {} to {} target(s)",
        report.job.doc.target,
        report.total()
    );
    if !p.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = p.wait_timeout.unwrap_or_else(|| {
        let rollout = match p.rate {
            Some(rate) if rate > 0 => {
                Duration::from_secs(60 * (report.total() as u64).div_ceil(rate as u64))
            }
            _ => Duration::ZERO,
        };
        p.timeout + Duration::from_secs(60) + rollout
    });
    let until = tokio::time::Instant::now() + deadline;
    let bar = indicatif::ProgressBar::new(report.total() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} finished  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // counts only while following (a job may have thousands of targets); the full
    // per-target table once at the end
    let mut in_time = true;
    loop {
        let r: JobReport = client.get(&format!("/jobs/{id}?executions=false")).await?;
        bar.set_length(r.total() as u64);
        bar.set_position(r.finished() as u64);
        bar.set_message(counts(&r));
        if r.finished() == r.total() && r.total() > 0
            || r.job.state != fleetbus_jobs::JobState::Active
        {
            break;
        }
        if tokio::time::Instant::now() >= until {
            in_time = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish();
    let report: JobReport = client.get(&format!("/jobs/{id}")).await?;
    print_report(&report);
    if !in_time && report.finished() < report.total() || report.total() == 0 {
        eprintln!(
            "stopped waiting after {}: {} of {} execution(s) not finished (the job goes on: fleetbus job status {id})",
            humantime::format_duration(deadline),
            report.total() - report.finished(),
            report.total()
        );
        return Ok(ExitCode::from(EXIT_UNFINISHED));
    }
    Ok(match bad(&report) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_FAILED),
    })
}

/// Executions that ended badly: failed, timed out, rejected or cancelled.
fn bad(report: &JobReport) -> usize {
    report.failed()
        + report
            .counts
            .get(&ExecutionState::Canceled)
            .copied()
            .unwrap_or(0)
}

/// The line of an execution's output worth a column: for one that ended badly the first
/// line of its stderr (where the reason usually is), else the first line of its stdout,
/// else the server's or agent's reason.
fn output_head(e: &fleetbus_jobs::Execution) -> String {
    let (stdout, stderr) = match e.output.split_once("[stderr]\n") {
        Some((out, err)) => (out, err),
        None => (e.output.as_str(), ""),
    };
    let first = |text: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("[... "))
            .map(str::to_string)
    };
    let failed = e.state.is_terminal() && e.state != ExecutionState::Succeeded;
    let picked = if failed {
        first(stderr).or_else(|| first(stdout))
    } else {
        first(stdout).or_else(|| first(stderr))
    };
    let text = picked.or_else(|| e.reason.clone()).unwrap_or_default();
    let mut head: String = text.chars().take(100).collect();
    if text.chars().count() > 100 {
        head.push('…');
    }
    head
}

fn counts(r: &JobReport) -> String {
    r.counts
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(r: &JobReport) {
    println!(
        "job {} ({} {:?}) for {}: {:?}; {}",
        r.job.doc.id,
        r.job.doc.operation,
        r.job.doc.args,
        r.job.doc.target,
        r.job.state,
        counts(r)
    );
    let ts = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
            .unwrap_or_else(|| "-".into())
    };
    let rows: Vec<[String; 6]> = r
        .executions
        .iter()
        .map(|e| {
            [
                e.agent.clone(),
                e.state.as_str().to_string(),
                ts(e.started),
                ts(e.finished),
                e.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                output_head(e),
            ]
        })
        .collect();
    print_table(
        ["agent", "state", "started", "finished", "exit", "output"],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execution(
        state: ExecutionState,
        output: &str,
        reason: Option<&str>,
    ) -> fleetbus_jobs::Execution {
        fleetbus_jobs::Execution {
            agent: "a".into(),
            state,
            sent: None,
            started: None,
            finished: None,
            exit_code: Some(1),
            output: output.into(),
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn the_output_column_shows_the_useful_line() {
        let failed = execution(
            ExecutionState::Failed,
            "\n[stderr]\nSystem has not been booted with systemd as init system (PID 1).\nFailed to connect to bus\n",
            None,
        );
        assert_eq!(
            output_head(&failed),
            "System has not been booted with systemd as init system (PID 1)."
        );
        let ok = execution(
            ExecutionState::Succeeded,
            "restarted\n[stderr]\nwarning: x\n",
            None,
        );
        assert_eq!(output_head(&ok), "restarted");
        let expired = execution(ExecutionState::TimedOut, "", Some("never started"));
        assert_eq!(output_head(&expired), "never started");
    }
}
