//! fleetbus end to end: simulated agents (agent library, disk outbox) → embedded broker →
//! rules engine → file sink.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbus_agent::{Agent, AgentConfig, Outbox};
use fleetbus_broker::acl::Role;
use fleetbus_broker::credentials::CredentialStore;
use fleetbus_config::Valid;
use fleetbus_mqtt::BrokerUrl;
use fleetbus_protocol::Record;
use fleetbus_server::{Server, ServerConfig};
use fleetbus_testkit::tls::TestCa;
use tokio::sync::watch;

use super::{BenchSecurity, IngestArgs, Measurement};

/// Stream the simulated agents write to.
const STREAM: &str = "bench";

/// Runs the end-to-end measurement.
pub async fn measure(args: &IngestArgs, security: BenchSecurity) -> anyhow::Result<Measurement> {
    let tmp = tempfile::Builder::new()
        .prefix("fleetbus-bench-")
        .tempdir()?;
    let port = fleetbus_broker::free_port()?;
    let mut config = ServerConfig {
        data_dir: tmp.path().join("data"),
        ..ServerConfig::default()
    };
    config.broker.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    config.admin.listen = None; // not needed, and never a fixed port
    let mut server_url = BrokerUrl::mqtt("127.0.0.1", port);
    let mut ca_file = None;
    let mut tokens = Vec::new();
    if security != BenchSecurity::Off {
        config.broker.security.enforce = true;
        let store = CredentialStore::open_in(&config.data_dir)?;
        for i in 0..args.clients {
            tokens.push(Some(store.enroll(
                &format!("bench-{i}"),
                Role::Agent,
                &[],
                false,
            )?));
        }
    }
    if security == BenchSecurity::Tls {
        let ca = TestCa::new("fleetbus bench CA")?;
        ca_file = Some(ca.write_ca(tmp.path(), "ca")?);
        let cert = ca.issue(tmp.path(), "server", &["127.0.0.1"])?;
        let tls_port = fleetbus_broker::free_port()?;
        config.broker.tls.listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port)));
        config.broker.tls.cert = Some(cert.cert);
        config.broker.tls.key = Some(cert.key);
        server_url = format!("mqtts://127.0.0.1:{tls_port}").parse()?;
    }
    let server = Server::start(&Valid::new(config.clone())?).await?;

    let pad = pad_for(args.payload);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut outboxes: Vec<Arc<Outbox>> = Vec::new();
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let mut c = AgentConfig {
            server: server_url.clone(),
            state_dir: tmp.path().join(format!("agent-{i}")),
            id: Some(format!("bench-{i}")),
            ..AgentConfig::default()
        };
        c.metrics.enabled = false;
        c.outbox.max_bytes = 1 << 30;
        c.connection.inflight = args.inflight;
        c.connection.token = tokens.get(i).cloned().flatten();
        c.connection.ca_file = ca_file.clone();
        let agent = Agent::open(Valid::new(c)?)?;
        outboxes.push(agent.outbox().clone());
        agents.spawn(agent.run(stop_rx.clone()));
    }

    let start = Instant::now();
    let deadline = start + args.duration;
    // the producers keep the agent's window full and a little more waiting behind it
    let backlog = args.inflight as u64 + 2_000;
    let mut producers = Vec::new();
    for outbox in &outboxes {
        let outbox = outbox.clone();
        let pad = pad.clone();
        let rate = args.rate;
        producers.push(tokio::spawn(async move {
            let mut pace = (rate > 0)
                .then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64)));
            let mut sent = 0u64;
            while Instant::now() < deadline {
                match pace.as_mut() {
                    Some(p) => {
                        p.tick().await;
                    }
                    // as fast as the pipeline takes them: keep a bounded backlog
                    None if outbox.stats().pending > backlog => {
                        tokio::time::sleep(Duration::from_micros(500)).await;
                        continue;
                    }
                    None => {}
                }
                let pushed = outbox.push(STREAM, |r| {
                    r.fields.insert("pad".into(), pad.clone().into());
                });
                if pushed.is_err() {
                    break;
                }
                sent += 1;
                if sent.is_multiple_of(256) {
                    tokio::task::yield_now().await;
                }
            }
            sent
        }));
    }
    let mut sent = 0;
    for p in producers {
        sent += p.await.unwrap_or(0);
    }
    let written = || -> u64 { server.stats().sinks.iter().map(|(_, s)| s.written).sum() };
    let mut seen = written();
    let mut last_change = Instant::now();
    while seen < sent && last_change.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = written();
        if now != seen {
            seen = now;
            last_change = Instant::now();
        }
    }
    let elapsed = last_change.saturating_duration_since(start);
    let _ = stop_tx.send(true);
    while agents.join_next().await.is_some() {}
    server.shutdown(Duration::from_secs(10)).await;
    Ok(Measurement {
        target: format!(
            "fleetbus end to end ({} agents, security {})",
            args.clients,
            match security {
                BenchSecurity::Off => "off",
                BenchSecurity::Enforce => "enforce",
                BenchSecurity::Tls => "enforce+tls",
            }
        ),
        sent,
        received: seen,
        elapsed,
    })
}

/// A padding string that makes an encoded bench record about `payload` bytes.
fn pad_for(payload: usize) -> String {
    let mut r = Record::new("bench-0", STREAM, 1_000_000, chrono::Utc::now());
    r.fields.insert("pad".into(), String::new().into());
    let base = r.encode().map(|b| b.len()).unwrap_or(0);
    "x".repeat(payload.saturating_sub(base))
}
