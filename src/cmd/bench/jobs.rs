//! `fleetbus bench jobs`: thousands of simulated agents connected to the embedded broker,
//! one group job, and the time from the push until the server's ledger shows every target
//! SUCCEEDED; also the server's memory per connected agent.
//!
//! The server runs as a child process (`fleetbus serve`), so its memory is its own. The
//! simulated agents run here, each a plain MQTT v4 connection (rumqttc's packet codec over
//! a tokio socket, no event loop, no disk) that does what a real agent does on the wire:
//! birth message with its group, subscriptions to its own and its group's notify topics,
//! Ed25519 verification of every command it receives, and the three status reports an
//! agent sends for a job it runs (QUEUED, IN_PROGRESS, SUCCEEDED, QoS 1). Connections come
//! from several 127.0.0.x source addresses so ephemeral ports never run short.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use chrono::Utc;
use ed25519_dalek::VerifyingKey;
use fleetbus_jobs::{JobReport, KnownAgent, PushRequest, Rollout};
use fleetbus_protocol::jobs::{agent_notify, group_notify, status};
use fleetbus_protocol::{
    topics, ExecutionState, JobCommand, JobStatus, JobTarget, Presence, PresenceStatus,
    SignedCommand,
};
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::upload::{peak_kib, resident_kib, start_server, wait_for_port};
use crate::cmd::admin_client::AdminClient;
use fleetbus_broker::acl::Role;

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsBenchArgs {
    /// Simulated agents, all in one group.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Loopback source addresses the agents connect from (127.0.0.1 ... 127.0.0.N).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub sources: u8,
    /// Connection handshakes in progress at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// How long to wait for every target to finish.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
}

/// The measured figures.
#[derive(Debug)]
pub struct Figures {
    /// Agents connected.
    pub agents: usize,
    /// From the first connection attempt until every agent had its subscriptions.
    pub connect: Duration,
    /// From the push request until the last agent received (and verified) the job.
    pub fan_out: Duration,
    /// From the push request until the ledger showed every target SUCCEEDED.
    pub all_succeeded: Duration,
    /// The server's resident memory before any agent connected, KiB.
    pub idle_kib: u64,
    /// The server's resident memory with every agent connected and known, KiB.
    pub connected_kib: u64,
    /// The server's peak resident memory over the whole run, KiB.
    pub peak_kib: u64,
    /// Status reports the agents sent.
    pub reports: u64,
}

const GROUP: &str = "bench";

/// Runs the benchmark.
pub async fn run(args: &JobsBenchArgs) -> anyhow::Result<Figures> {
    anyhow::ensure!(args.agents > 0, "--agents must be at least 1");
    let dir = tempfile::Builder::new()
        .prefix("fleetbus-bench-jobs-")
        .tempdir()
        .context("temporary directory")?;
    let keys = crate::cmd::keys::write_pair(&dir.path().join("keys"), false)?;
    let key = fleetbus_protocol::jobs::verifying_key_from_hex(&keys.public_hex)
        .map_err(|e| anyhow::anyhow!("bench key: {e}"))?;

    let port = fleetbus_broker::free_port()?;
    let admin = fleetbus_broker::free_port()?;
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = {}\n[jobs]\nsigning_key = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            args.agents + 100,
            keys.secret.display()
        ),
    )?;
    // the operator credential the bench talks to the admin endpoint with
    let store = fleetbus_broker::credentials::CredentialStore::open_in(&dir.path().join("data"))?;
    let token = store.enroll("bench-operator", Role::Operator, &[], false)?;
    drop(store);
    let (mut server, pid) = start_server(&config)?;
    wait_for_port(admin).await?;
    let client = AdminClient::new(&format!("http://127.0.0.1:{admin}"), Some(token));
    let _: Vec<KnownAgent> = client.get("/agents").await?;
    let idle_kib = resident_kib(pid).unwrap_or(0);

    // connect every agent
    let shared = Arc::new(Shared {
        key,
        started: Instant::now(),
        received: AtomicUsize::new(0),
        last_received_us: AtomicU64::new(0),
        reports: AtomicU64::new(0),
    });
    let server_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut agents = tokio::task::JoinSet::new();
    let connecting = Instant::now();
    for i in 0..args.agents {
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i % args.sources as usize) as u8);
        let sim = SimAgent {
            id: format!("bench-{i:05}"),
            shared: shared.clone(),
        };
        let permits = permits.clone();
        let ready = ready_tx.clone();
        agents.spawn(async move {
            let stream = {
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                match sim.handshake(server_addr, source).await {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                }
            };
            sim.serve(stream).await;
        });
    }
    drop(ready_tx);
    for n in 0..args.agents {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e.context(format!("after {n} agents connected"))),
            None => anyhow::bail!("agents stopped after {n} connected"),
        }
    }
    let connect = connecting.elapsed();
    // the server knows every member (birth messages reach the ledger)
    let deadline = Instant::now() + args.deadline;
    loop {
        let members: Vec<KnownAgent> = client.get(&format!("/agents?group={GROUP}")).await?;
        if members.iter().filter(|a| a.online).count() == args.agents {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server knows {} of {} agents",
            members.len(),
            args.agents
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connected_kib = resident_kib(pid).unwrap_or(0);

    // one group job
    let pushed = Instant::now();
    let pushed_us = shared.started.elapsed().as_micros() as u64;
    let report: JobReport = client
        .post(
            "/jobs",
            &PushRequest {
                target: JobTarget::Group(GROUP.into()),
                operation: "echo".into(),
                args: [("msg".to_string(), "hello".to_string())].into(),
                timeout_secs: 60,
                rollout: Rollout::default(),
                allow_empty: false,
            },
        )
        .await?;
    anyhow::ensure!(
        report.total() == args.agents,
        "the job has {} targets, not {}",
        report.total(),
        args.agents
    );
    let path = format!("/jobs/{}?executions=false", report.job.doc.id);
    let all_succeeded = loop {
        let r: JobReport = client.get(&path).await?;
        let succeeded = r
            .counts
            .get(&ExecutionState::Succeeded)
            .copied()
            .unwrap_or(0);
        if succeeded == args.agents {
            break pushed.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < pushed + args.deadline,
            "after {:?}: {} of {} SUCCEEDED ({:?}), {} agents received the job",
            pushed.elapsed(),
            succeeded,
            args.agents,
            r.counts,
            shared.received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let fan_out = Duration::from_micros(
        shared
            .last_received_us
            .load(Ordering::Relaxed)
            .saturating_sub(pushed_us),
    );
    let peak = peak_kib(pid).unwrap_or(0);
    agents.abort_all();
    while agents.join_next().await.is_some() {}
    let _ = server.kill().await;
    Ok(Figures {
        agents: args.agents,
        connect,
        fan_out,
        all_succeeded,
        idle_kib,
        connected_kib,
        peak_kib: peak,
        reports: shared.reports.load(Ordering::Relaxed),
    })
}

/// Prints the figures as a table.
pub fn print(f: &Figures) {
    let kib_per_agent = f.connected_kib.saturating_sub(f.idle_kib) as f64 / f.agents.max(1) as f64;
    let mib = |k: u64| k as f64 / 1024.0;
    println!("{:<52} {:>12}", "simulated agents (one group)", f.agents);
    println!(
        "{:<52} {:>10.2} s",
        "connect + birth + subscribe, all agents",
        f.connect.as_secs_f64()
    );
    println!(
        "{:<52} {:>9.0} ms",
        "push -> last agent received and verified the job",
        f.fan_out.as_secs_f64() * 1e3
    );
    println!(
        "{:<52} {:>9.0} ms",
        "push -> ledger shows every target SUCCEEDED",
        f.all_succeeded.as_secs_f64() * 1e3
    );
    println!("{:<52} {:>12}", "status reports sent by agents", f.reports);
    println!(
        "{:<52} {:>8.1} MiB",
        "server resident memory, no agents",
        mib(f.idle_kib)
    );
    println!(
        "{:<52} {:>8.1} MiB",
        "server resident memory, all agents connected",
        mib(f.connected_kib)
    );
    println!(
        "{:<52} {:>8.1} MiB",
        "server peak resident memory",
        mib(f.peak_kib)
    );
    println!(
        "{:<52} {:>8.1} KiB",
        "server memory per connected agent", kib_per_agent
    );
}

/// What every simulated agent shares.
struct Shared {
    /// The job signing public key.
    key: VerifyingKey,
    /// Time zero for `last_received_us`.
    started: Instant,
    /// Agents that received a valid job.
    received: AtomicUsize,
    /// When the last one did (µs after `started`).
    last_received_us: AtomicU64,
    /// Status reports sent.
    reports: AtomicU64,
}

/// One simulated agent.
struct SimAgent {
    id: String,
    shared: Arc<Shared>,
}

/// Largest packet a simulated agent accepts.
const MAX_PACKET: usize = 256 * 1024;

impl SimAgent {
    /// Connects from `source`, announces itself, subscribes; answers once the broker
    /// acknowledged the birth message and the subscriptions.
    async fn handshake(&self, server: SocketAddr, source: Ipv4Addr) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::from((source, 0)))
            .with_context(|| format!("binding {source}"))?;
        let stream = socket
            .connect(server)
            .await
            .with_context(|| format!("{}: connecting from {source}", self.id))?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(1024),
            out: BytesMut::with_capacity(512),
            pkid: 0,
        };
        let mut connect = Connect::new(self.id.clone());
        // rumqttd refuses 0 (no keep-alive); the run is far shorter than an hour, so the
        // simulated agents never need to ping
        connect.keep_alive = 3600;
        connect.write(&mut conn.out)?;
        conn.flush().await?;
        match conn.next().await? {
            Packet::ConnAck(ack) if ack.code == rumqttc::ConnectReturnCode::Success => {}
            other => anyhow::bail!("{}: refused: {other:?}", self.id),
        }
        let mut birth = Presence::offline(&self.id, Utc::now());
        birth.status = PresenceStatus::Online;
        birth.groups = vec![GROUP.to_string()];
        let payload = birth.encode()?;
        let pkid = conn.pkid();
        let mut publish = Publish::new(topics::presence(&self.id), QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        publish.write(&mut conn.out)?;
        let mut subscribe = Subscribe::new_many([
            SubscribeFilter::new(agent_notify(&self.id), QoS::AtLeastOnce),
            SubscribeFilter::new(group_notify(GROUP), QoS::AtLeastOnce),
        ]);
        subscribe.pkid = conn.pkid();
        subscribe.write(&mut conn.out)?;
        conn.flush().await?;
        let (mut acked, mut subscribed) = (false, false);
        while !(acked && subscribed) {
            match conn.next().await? {
                Packet::PubAck(a) if a.pkid == pkid => acked = true,
                Packet::SubAck(_) => subscribed = true,
                _ => {}
            }
        }
        Ok(conn)
    }

    /// Answers jobs until the connection ends.
    async fn serve(&self, mut conn: Conn) {
        loop {
            let Ok(packet) = conn.next().await else {
                return;
            };
            let Packet::Publish(p) = packet else { continue };
            if p.qos == QoS::AtLeastOnce && PubAck::new(p.pkid).write(&mut conn.out).is_err() {
                return;
            }
            if let Ok(JobCommand::Run { job, .. }) =
                SignedCommand::verify(&p.payload, &self.shared.key)
            {
                self.shared.received.fetch_add(1, Ordering::Relaxed);
                let at = self.shared.started.elapsed().as_micros() as u64;
                self.shared
                    .last_received_us
                    .fetch_max(at, Ordering::Relaxed);
                let started = Utc::now();
                for (state, finished) in [
                    (ExecutionState::Queued, None),
                    (ExecutionState::InProgress, None),
                    (ExecutionState::Succeeded, Some(Utc::now())),
                ] {
                    let report = JobStatus {
                        job_id: job.id.clone(),
                        state,
                        started: (state != ExecutionState::Queued).then_some(started),
                        finished,
                        exit_code: finished.map(|_| 0),
                        output: if finished.is_some() {
                            "msg=hello".into()
                        } else {
                            String::new()
                        },
                        reason: None,
                    };
                    let Ok(payload) = report.encode() else { return };
                    let mut publish = Publish::new(status(&self.id), QoS::AtLeastOnce, payload);
                    publish.pkid = conn.pkid();
                    if publish.write(&mut conn.out).is_err() {
                        return;
                    }
                    self.shared.reports.fetch_add(1, Ordering::Relaxed);
                }
            }
            if conn.flush().await.is_err() {
                return;
            }
        }
    }
}

/// A simulated agent's MQTT connection: read buffer, write buffer, packet ids.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    pkid: u16,
}

impl Conn {
    fn pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// The next packet from the broker.
    async fn next(&mut self) -> anyhow::Result<Packet> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => anyhow::bail!("bad packet from the broker: {e:?}"),
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("the broker closed the connection");
            }
        }
    }
}
