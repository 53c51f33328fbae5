//! `fleetbus job ...`: push, follow, list and cancel jobs through a running server's admin
//! endpoint (`[admin] listen`, default 127.0.0.1:7070).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetbus_jobs::{JobReport, PushRequest, Rollout};
use fleetbus_protocol::{ExecutionState, JobTarget};

use super::admin_client::{AdminClient, AdminEndpoint};

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
    /// Per-target table of a job: state, started, finished, exit code, output head.
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
    /// Follow the job with a progress bar until every target finished; exit 1 if any failed.
    #[arg(long)]
    wait: bool,
}

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
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::List { limit } => {
            let list: Vec<JobReport> = client.get(&format!("/jobs?limit={limit}")).await?;
            println!(
                "{:<34} {:<20} {:<18} {:<9} counts",
                "job", "operation", "target", "state"
            );
            for r in list {
                println!(
                    "{:<34} {:<20} {:<18} {:<9} {}",
                    r.job.doc.id,
                    r.job.doc.operation,
                    r.job.doc.target.to_string(),
                    format!("{:?}", r.job.state).to_lowercase(),
                    counts(&r)
                );
            }
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
    let bar = indicatif::ProgressBar::new(report.total() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} finished  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // counts only while following (a job may have thousands of targets); the full
    // per-target table once at the end
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish();
    let report: JobReport = client.get(&format!("/jobs/{id}")).await?;
    print_report(&report);
    let bad = report.failed()
        + report
            .counts
            .get(&ExecutionState::Canceled)
            .copied()
            .unwrap_or(0);
    Ok(if bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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
    println!(
        "{:<24} {:<12} {:<24} {:<24} {:>5}  output",
        "agent", "state", "started", "finished", "exit"
    );
    let ts = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
            .unwrap_or_else(|| "-".into())
    };
    for e in &r.executions {
        let head: String = e
            .reason
            .clone()
            .filter(|_| e.output.is_empty())
            .unwrap_or_else(|| e.output.clone())
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        println!(
            "{:<24} {:<12} {:<24} {:<24} {:>5}  {}",
            e.agent,
            e.state.as_str(),
            ts(e.started),
            ts(e.finished),
            e.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            head
        );
    }
}
