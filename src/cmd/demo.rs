//! `fleetbus demo`: a server on the embedded defaults (temporary data directory, free
//! port) and three agents in different groups, publishing for a few seconds; then a report
//! of what arrived where. Exits non-zero if any agent's records are missing or out of order.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fleetbus_agent::{Agent, AgentConfig};
use fleetbus_mqtt::BrokerUrl;
use fleetbus_server::{Server, ServerConfig};
use fleetbus_sinks::inventory;
use tokio::sync::watch;

/// `fleetbus demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the agents publish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keep the temporary directory (its path is printed) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

const GROUPS: [&str; 3] = ["web", "db", "edge"];

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new()
        .prefix("fleetbus-demo-")
        .tempdir()?;
    let port = fleetbus_broker::free_port().context("no free TCP port on 127.0.0.1")?;
    let mut config = ServerConfig {
        data_dir: tmp.path().join("data"),
        ..ServerConfig::default()
    };
    config.broker.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let admin = fleetbus_broker::free_port().context("no free TCP port on 127.0.0.1")?;
    config.admin.listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, admin)));
    let server = Server::start(&config).await?;
    println!(
        "server:  mqtt://{} (embedded broker, built-in rules: archive all telemetry to files)",
        server.addr()
    );
    println!("data:    {}", config.data_dir.display());

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = tokio::task::JoinSet::new();
    let mut ids = Vec::new();
    for group in GROUPS {
        let mut agent_config = AgentConfig {
            server: BrokerUrl::mqtt("127.0.0.1", port),
            state_dir: tmp.path().join(format!("agent-{group}")),
            groups: vec![group.to_string()],
            ..AgentConfig::default()
        };
        agent_config.tags.insert("demo".into(), "true".into());
        agent_config.metrics.interval = Duration::from_secs(1);
        agent_config.heartbeat.enabled = true;
        agent_config.heartbeat.interval = Duration::from_millis(200);
        let agent = Agent::open(agent_config)?;
        println!("agent:   {} (group {group})", agent.id());
        ids.push((agent.id().to_string(), group));
        agents.spawn(agent.run(stop_rx.clone()));
    }
    println!("publishing for {:?} ...", args.duration);
    tokio::time::sleep(args.duration).await;
    let _ = stop_tx.send(true);
    while let Some(done) = agents.join_next().await {
        done??;
    }
    let stats = server.stats();
    server.shutdown(Duration::from_secs(10)).await;

    let inv = inventory::scan(&config.data_dir)?;
    println!();
    println!(
        "{:<38} {:<6} {:<10} {:>8} {:>10} {:>10}  delivery",
        "agent", "group", "stream", "records", "first seq", "last seq"
    );
    let mut ok = true;
    for (id, group) in &ids {
        let mut any = false;
        for ((agent, stream), s) in inv.streams.iter().filter(|((a, _), _)| a == id) {
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
            println!(
                "{agent:<38} {group:<6} {stream:<10} {:>8} {:>10} {:>10}  {verdict}",
                s.records, s.first_seq, s.last_seq
            );
        }
        if !any {
            ok = false;
            println!("{id:<38} {group:<6} {:<10} {:>8}  NOTHING ARRIVED", "-", 0);
        }
    }
    println!();
    println!("sink files ({}):", inv.files.len());
    for (path, lines, bytes) in &inv.files {
        let shown = path.strip_prefix(&config.data_dir).unwrap_or(path);
        println!(
            "  {:<70} {lines:>6} lines {bytes:>9} bytes",
            shown.display()
        );
    }
    println!();
    println!(
        "rules engine: {} messages received, {} matched no rule (presence messages: the built-in rules archive telemetry only), {} undecodable",
        stats.received, stats.unrouted, stats.decode_errors
    );
    if args.keep {
        let kept = tmp.keep();
        println!("kept: {}", kept.display());
    }
    if ok {
        println!("demo ok: every agent's records arrived exactly once, in order");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("demo FAILED: some records are missing, duplicated or out of order");
        Ok(ExitCode::FAILURE)
    }
}
