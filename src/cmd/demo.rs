//! `fleetbus demo`: the product in well under a minute, on loopback and free ports only. A
//! server with a rules file of its own (two telemetry rules into two sinks, one rule for
//! files, one for job events), three agents in groups publishing telemetry, one of them
//! uploading a file that is then checked byte for byte, and a group job pushed through the
//! admin endpoint and followed to SUCCEEDED on every member. Each agent runs a built-in
//! check; the edge agent also a plugin that reports CRITICAL, whose HARD state becomes an
//! event in the event console. Then a summary of what went where. Exits non-zero if
//! anything did not arrive as promised.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fleetbus_agent::checks::builtin::TcpCheck;
use fleetbus_agent::checks::CheckConfig;
use fleetbus_agent::job_runner::HandlerConfig;
use fleetbus_agent::{AfterUpload, Agent, AgentConfig, UploadOutcome, UploadQueue};
use fleetbus_broker::acl::Role;
use fleetbus_broker::credentials::CredentialStore;
use fleetbus_config::Valid;
use fleetbus_console::{Console, Filter};
use fleetbus_jobs::{JobReport, KnownAgent, PushRequest, Rollout};
use fleetbus_mqtt::BrokerUrl;
use fleetbus_pipeline::inventory;
use fleetbus_protocol::{ExecutionState, JobTarget};
use fleetbus_server::{Server, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::admin_client::AdminClient;
use super::table::print_table;

/// `fleetbus demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the agents publish telemetry.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keep the temporary directory (its path is printed) to look at afterwards, instead
    /// of deleting it.
    #[arg(long)]
    keep: bool,
}

/// The agents: a name for the demo's output and their groups.
const AGENTS: [(&str, &[&str]); 3] = [
    ("web-a", &["web", "eu"]),
    ("web-b", &["web", "us"]),
    ("edge", &["edge", "eu"]),
];

/// The demo's rules: two telemetry rules into two sinks, files and job events.
const RULES: &str = r#"
[sinks.archive]
type = "file"
path = "archive/{agent}/{stream}.jsonl"

[sinks.cpu]
type = "file"
path = "cpu/{agent}.jsonl"

[sinks.uploads]
type = "file"
path = "uploads/{agent}/{file.name}"

[sinks.jobs]
type = "file"
path = "job-events.jsonl"

[sinks.console]
type = "console"

[[rules]]
name = "archive-telemetry"
from = ["fleet/+/telemetry/#"]
to = ["archive"]

[[rules]]
name = "cpu-samples"
from = ["fleet/+/telemetry/metrics"]
where = 'record.metrics.exists(m, m.name == "cpu.usage")'
to = ["cpu"]

[[rules]]
name = "uploaded-files"
from = ["fleet/+/files/+/complete"]
to = ["uploads"]

[[rules]]
name = "job-audit"
from = ["fleet/+/jobs/event"]
to = ["jobs"]

[[rules]]
name = "console"
from = ["fleet/+/telemetry/events", "fleet/+/telemetry/checks"]
where = "has(record.event) || has(record.check)"
to = ["console"]
"#;

/// The edge agent's plugin: a queue check that finds too many messages waiting.
const QUEUE_PLUGIN: &str =
    "echo 'QUEUE CRITICAL - 812 messages waiting | waiting=812;100;500;0'; exit 2";

/// Size of the file the edge agent uploads.
const UPLOAD_BYTES: usize = 3 * 1024 * 1024 + 12_345;

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("fleetbus-demo-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let free = || fleetbus_broker::free_port().context("no free TCP port on 127.0.0.1");
    let port = free()?;
    let admin_port = free()?;
    let mut config = ServerConfig {
        data_dir: dir.join("data"),
        ..ServerConfig::default()
    };
    config.broker.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    config.admin.listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port)));
    std::fs::write(dir.join("rules.toml"), RULES)?;
    config.rules.file = Some(dir.join("rules.toml"));
    let keys = super::keys::write_pair(&dir.join("keys"), false)?;
    config.jobs.signing_key = Some(keys.secret);
    std::fs::create_dir_all(&config.data_dir)?;
    let operator = CredentialStore::open_in(&config.data_dir)?.enroll(
        "demo-operator",
        Role::Operator,
        &[],
        false,
    )?;

    let server = Server::start(&Valid::new(config.clone())?).await?;
    println!(
        "server   mqtt://{} with rules {}",
        server.addr(),
        dir.join("rules.toml").display()
    );
    println!(
        "         admin endpoint http://127.0.0.1:{admin_port}, data in {}",
        config.data_dir.display()
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut running = tokio::task::JoinSet::new();
    let mut agents = Vec::new();
    for (name, groups) in AGENTS {
        let mut c = AgentConfig {
            server: BrokerUrl::mqtt("127.0.0.1", port),
            state_dir: dir.join(format!("agent-{name}")),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..AgentConfig::default()
        };
        c.tags.insert("demo".into(), name.into());
        c.metrics.interval = Duration::from_secs(1);
        c.heartbeat.enabled = true;
        c.heartbeat.interval = Duration::from_millis(200);
        c.jobs.public_key = Some(keys.public_hex.clone());
        c.jobs.handlers.insert(
            "kernel-version".into(),
            HandlerConfig::new(&["uname", "-sr"], &[], Duration::from_secs(10)),
        );
        let mut broker_port = CheckConfig::new(&[], Duration::from_secs(1));
        broker_port.tcp = Some(TcpCheck {
            address: format!("127.0.0.1:{port}"),
        });
        c.checks.insert("broker-port".into(), broker_port);
        if name == "edge" {
            let mut queue = CheckConfig::new(&["sh", "-c", QUEUE_PLUGIN], Duration::from_secs(1));
            queue.max_attempts = 2;
            c.checks.insert("queue".into(), queue);
        }
        let agent = Agent::open(Valid::new(c)?)?;
        println!(
            "agent    {name:<6} {} groups {}",
            agent.id(),
            groups.join(",")
        );
        agents.push((name, agent.id().to_string(), agent.uploads().clone()));
        running.spawn(agent.run(stop_rx.clone()));
    }

    // a file from the edge agent, over the same connection as its telemetry
    let original = dir.join("edge-diagnostics.bin");
    let bytes: Vec<u8> = (0..UPLOAD_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&original, &bytes)?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let (edge_name, edge_id, edge_uploads) = agents
        .iter()
        .find(|(n, _, _)| *n == "edge")
        .context("the edge agent")?;
    let path = original.clone();
    let job = tokio::task::spawn_blocking(move || {
        UploadQueue::prepare(
            &path,
            fleetbus_protocol::files::DEFAULT_CHUNK_SIZE,
            Default::default(),
            AfterUpload::Keep,
        )
    })
    .await??;
    edge_uploads.submit(&job)?;
    println!(
        "upload   {edge_name}: {} ({} bytes, sha256 {}...)",
        job.manifest.name,
        bytes.len(),
        &sha[..16]
    );

    // a group job once the server knows both web members
    let client = AdminClient::new(&format!("http://127.0.0.1:{admin_port}"), Some(operator));
    let members = wait_for_members(&client, "web", 2).await?;
    let report: JobReport = client
        .post(
            "/jobs",
            &PushRequest {
                target: JobTarget::Group("web".into()),
                operation: "kernel-version".into(),
                args: Default::default(),
                timeout_secs: 30,
                rollout: Rollout::default(),
                allow_empty: false,
            },
        )
        .await?;
    let job_id = report.job.doc.id.clone();
    println!(
        "job      {job_id}: kernel-version to group web ({members} members), one signed publish"
    );
    println!(
        "publishing telemetry for {} ...",
        humantime::format_duration(args.duration)
    );

    let upload = tokio::time::timeout(
        Duration::from_secs(30),
        edge_uploads.wait(&job.manifest.file_id),
    )
    .await
    .context("the upload did not finish within 30 s")?;
    let job_report = wait_for_job(&client, &job_id).await?;
    // the edge agent's queue check turns HARD CRITICAL on its second run: its event
    wait_for_console_row(&config.data_dir.join(&config.console.path), "queue").await;
    let remaining = args.duration.saturating_sub(started.elapsed());
    tokio::time::sleep(remaining).await;
    let _ = stop_tx.send(true);
    while let Some(done) = running.join_next().await {
        done??;
    }
    let stats = server.stats();
    server.shutdown(Duration::from_secs(10)).await;

    let mut ok = true;
    println!();
    println!("== telemetry (rule archive-telemetry -> sink archive) ==");
    let inv = inventory::scan(&config.data_dir.join("archive"))?;
    let mut rows = Vec::new();
    for (name, id, _) in &agents {
        let mut any = false;
        for ((_, stream), s) in inv.streams.iter().filter(|((a, _), _)| a == id) {
            any = true;
            let verdict = if s.is_contiguous() {
                "complete, in order".to_string()
            } else {
                ok = false;
                format!(
                    "{} missing, {} duplicate, {} out of order",
                    s.missing, s.duplicates, s.out_of_order
                )
            };
            rows.push([
                name.to_string(),
                stream.clone(),
                s.records.to_string(),
                format!("{}..{}", s.first_seq, s.last_seq),
                verdict,
            ]);
        }
        if !any {
            ok = false;
            rows.push([
                name.to_string(),
                "-".into(),
                "0".into(),
                "-".into(),
                "NOTHING ARRIVED".into(),
            ]);
        }
    }
    print_table(["agent", "stream", "records", "seq", "delivery"], &rows);

    println!();
    println!("== checks (stream checks -> sink archive; their events -> sink console) ==");
    let mut rows = Vec::new();
    for (name, id, _) in &agents {
        let results = count_lines(&config.data_dir.join(format!("archive/{id}/checks.jsonl")));
        if results == 0 {
            ok = false;
        }
        rows.push([name.to_string(), results.to_string()]);
    }
    print_table(["agent", "check results"], &rows);
    let console = Console::open(&config.data_dir.join(&config.console.path))?;
    let rows: Vec<[String; 6]> = console
        .list(&Filter::default())?
        .into_iter()
        .map(|r| {
            let name = agents
                .iter()
                .find(|(_, id, _)| id == &r.agent)
                .map(|(n, _, _)| n.to_string())
                .unwrap_or_else(|| r.agent.clone());
            [
                name,
                format!("{} {}", r.class, r.rule.unwrap_or_default()),
                format!("{:?}", r.state).to_lowercase(),
                r.severity.to_string(),
                r.count.to_string(),
                r.text,
            ]
        })
        .collect();
    println!("event console (fleetbus events list):");
    print_table(
        ["agent", "class rule", "state", "sev", "count", "text"],
        &rows,
    );
    let queue_event = rows
        .iter()
        .any(|r| r[0] == "edge" && r[1] == "check.state queue" && r[2] == "open");
    if !queue_event {
        ok = false;
        println!("the edge agent's CRITICAL queue check is NOT in the console");
    }

    println!();
    println!("== cpu samples (rule cpu-samples, a CEL condition -> sink cpu) ==");
    let mut rows = Vec::new();
    for (name, id, _) in &agents {
        let lines = count_lines(&config.data_dir.join(format!("cpu/{id}.jsonl")));
        if lines == 0 {
            ok = false;
        }
        rows.push([
            name.to_string(),
            format!("cpu/{id}.jsonl"),
            lines.to_string(),
        ]);
    }
    print_table(["agent", "file", "records"], &rows);

    println!();
    println!("== file upload (rule uploaded-files -> sink uploads) ==");
    let landed = config
        .data_dir
        .join(format!("uploads/{edge_id}/{}", job.manifest.name));
    let landed_sha = std::fs::read(&landed)
        .map(|b| hex::encode(Sha256::digest(&b)))
        .unwrap_or_default();
    match &upload {
        UploadOutcome::Confirmed { landed: told, .. } if landed_sha == sha => {
            println!(
                "{} ({} bytes) -> {}: sha256 matches the original",
                job.manifest.name,
                bytes.len(),
                landed.strip_prefix(&dir).unwrap_or(&landed).display()
            );
            println!("the server told the agent where: {}", told.join(", "));
        }
        other => {
            ok = false;
            println!(
                "upload NOT verified: {other:?}; landed sha256 {landed_sha:?}, original {sha}"
            );
        }
    }

    println!();
    println!("== group job (rule job-audit -> sink jobs: every state change) ==");
    let mut rows = Vec::new();
    for e in &job_report.executions {
        let name = agents
            .iter()
            .find(|(_, id, _)| id == &e.agent)
            .map(|(n, _, _)| n.to_string())
            .unwrap_or_else(|| e.agent.clone());
        if e.state != ExecutionState::Succeeded {
            ok = false;
        }
        rows.push([
            name,
            e.state.as_str().to_string(),
            e.output.lines().next().unwrap_or("").to_string(),
        ]);
    }
    print_table(["agent", "state", "output"], &rows);
    if job_report.executions.len() != 2 {
        ok = false;
    }
    println!(
        "job events written: {}",
        count_lines(&config.data_dir.join("job-events.jsonl"))
    );

    println!();
    println!(
        "rules engine: {} messages received, {} matched no rule (presence messages), {} undecodable; took {:.1} s",
        stats.received,
        stats.unrouted,
        stats.decode_errors,
        started.elapsed().as_secs_f64()
    );
    if args.keep {
        let kept = tmp.keep();
        println!(
            "kept: {} (the server's data under data/, each agent's state under agent-*/)",
            kept.display()
        );
    } else {
        println!("the temporary directory is deleted now; run `fleetbus demo --keep` to look at it afterwards");
    }
    if ok {
        println!("demo ok: telemetry complete and in order, routed by rules to their sinks, the file verified, the group job SUCCEEDED on every member, the CRITICAL check in the event console");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("demo FAILED: see above");
        Ok(ExitCode::FAILURE)
    }
}

/// Waits until the server knows `n` online members of `group` (from their birth messages).
async fn wait_for_members(client: &AdminClient, group: &str, n: usize) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let known: Vec<KnownAgent> = client.get(&format!("/agents?group={group}")).await?;
        let online = known.iter().filter(|a| a.online).count();
        if online >= n {
            return Ok(online);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {online} of {n} members of {group} connected within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows a job until every execution finished (at most 30 s).
/// Waits (at most 15 s) until the console has an open row of check `rule`.
async fn wait_for_console_row(path: &Path, rule: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let found = Console::open(path)
            .and_then(|c| c.list(&Filter::default()))
            .is_ok_and(|rows| rows.iter().any(|r| r.rule.as_deref() == Some(rule)));
        if found {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_job(client: &AdminClient, id: &str) -> anyhow::Result<JobReport> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report: JobReport = client.get(&format!("/jobs/{id}")).await?;
        if report.total() > 0 && report.finished() == report.total() {
            return Ok(report);
        }
        if Instant::now() >= deadline {
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}
