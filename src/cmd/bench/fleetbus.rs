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

/// A benchmark server's configuration: data under `dir/data`, the broker on a free
/// loopback port (returned), no admin endpoint (not needed, and never a fixed port).
pub fn server_config(dir: &std::path::Path) -> anyhow::Result<(ServerConfig, u16)> {
    let port = fleetbus_broker::free_port()?;
    let mut config = ServerConfig {
        data_dir: dir.join("data"),
        ..ServerConfig::default()
    };
    config.broker.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    config.admin.listen = None;
    Ok((config, port))
}

/// Runs the end-to-end measurement, with the built-in rules or a generated file of `rules`
/// rules ([`rules_file`]).
pub async fn measure(
    args: &IngestArgs,
    security: BenchSecurity,
    rules: Option<usize>,
) -> anyhow::Result<Measurement> {
    let tmp = tempfile::Builder::new()
        .prefix("fleetbus-bench-")
        .tempdir()?;
    let (mut config, port) = server_config(tmp.path())?;
    if let Some(n) = rules {
        let path = tmp.path().join("rules.toml");
        std::fs::write(&path, rules_file(n))?;
        config.rules.file = Some(path);
    }
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
    // with generated rules, the archive takes every record once (other sinks take some)
    let written = || -> u64 {
        let stats = server.stats();
        match rules {
            Some(_) => stats.written("archive"),
            None => stats.sinks.iter().map(|(_, s)| s.written).sum(),
        }
    };
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
            "fleetbus end to end ({} agents,{} security {})",
            args.clients,
            rules.map(|n| format!(" {n} rules,")).unwrap_or_default(),
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

/// A rules file of `n` rules for `bench ingest --rules N`: rule 1 archives every record;
/// the others, in turn, (a) sample the records of one agent (`bench-K`, of 250 names, so a
/// handful match each simulated agent) with a condition and a transform, (b) look for an
/// alert field in one agent's records, (c) take a stream nobody sends, (d) explode the
/// readings of a third-party site's sensors. Most rules name agents or sites other than
/// a given message's, as in a fleet with many.
pub fn rules_file(n: usize) -> String {
    let mut text = String::from(
        "[sinks.archive]\ntype = \"file\"\npath = \"bench/{agent}.jsonl\"\n\
         [sinks.sampled]\ntype = \"file\"\npath = \"sampled/{agent}.jsonl\"\n\
         [sinks.other]\ntype = \"file\"\npath = \"other/{agent}.jsonl\"\n\
         [[rules]]\nname = \"archive\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"archive\"]\n",
    );
    for k in 1..n {
        let agent = format!("bench-{}", k % 250);
        let rule = match k % 4 {
            0 => format!(
                "from = [\"fleet/{agent}/telemetry/#\"]\nwhere = 'record.seq % 1000u == 7u'\n\
                 set = {{ rule = \"'r{k}'\", seq = \"record.seq\" }}\nkeep = [\"rule\", \"seq\"]\nto = [\"sampled\"]\n"
            ),
            1 => format!(
                "from = [\"fleet/{agent}/telemetry/{STREAM}\"]\n\
                 where = 'has(record.fields.alert) && record.fields.alert == \"r{k}\"'\nto = [\"other\"]\n"
            ),
            2 => format!("from = [\"fleet/+/telemetry/stream-{k}\"]\nto = [\"other\"]\n"),
            _ => format!(
                "from = [\"site-{k}/+/sensors/#\"]\nforeach = \"record.readings\"\n\
                 set = {{ site = \"'{k}'\" }}\nto = [\"other\"]\n"
            ),
        };
        text.push_str(&format!("[[rules]]\nname = \"r{k}\"\n{rule}"));
    }
    text
}

/// How long routing one bench record (of about `payload` bytes) through [`rules_file`]`(n)`
/// takes on one thread: `route` and `settle`, averaged over many.
pub fn routing_cost(n: usize, payload: usize) -> anyhow::Result<Duration> {
    use fleetbus_rules::router::{Router, Routing};
    let set =
        fleetbus_rules::RuleSet::parse(std::path::Path::new("bench-rules.toml"), &rules_file(n))?;
    let router = Router::new(set.rules);
    let pad = pad_for(payload);
    let mut messages = Vec::new();
    for i in 0..4u64 {
        let mut r = Record::new(format!("bench-{i}"), STREAM, 1_000 + i, chrono::Utc::now());
        r.fields.insert("pad".into(), pad.clone().into());
        let topic = format!("fleet/bench-{i}/telemetry/{STREAM}");
        messages.push(fleetbus_protocol::Message::decode(&topic, &r.encode()?)?);
    }
    let mut routing = Routing::default();
    let rounds = 50_000u32;
    let started = Instant::now();
    for round in 0..rounds {
        let msg = &messages[round as usize % messages.len()];
        router.route(msg, &mut routing);
        router.settle(&mut routing, 0);
    }
    Ok(started.elapsed() / rounds)
}
