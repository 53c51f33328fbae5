//! A `fleetbus serve` process with `[broker.security]` (enforced or not), its broker
//! events and telemetry routed into file sinks that tests read back, and raw MQTT clients.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};

use super::{free_port, poll_until, ServeProc};

/// A server enforcing security, its events written to `data/events/{kind}.jsonl`.
pub struct Secured {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: ServeProc,
}

impl Secured {
    /// Starts a server enforcing security.
    pub fn start(dir: &Path) -> Secured {
        Secured::start_with(dir, true, "")
    }

    /// Starts a server with `enforce` as `broker.security.enforce` and `extra` inside its
    /// `[broker]` table, after `listen` (more keys such as `max_connections`, then tables
    /// such as `[broker.limits]`).
    pub fn start_with(dir: &Path, enforce: bool, extra: &str) -> Secured {
        Secured::start_with_rules(dir, enforce, extra, "")
    }

    /// [`Secured::start_with`], with `more_rules` (TOML: sinks and rules) added to its
    /// rules file.
    pub fn start_with_rules(dir: &Path, enforce: bool, extra: &str, more_rules: &str) -> Secured {
        let port = free_port();
        fs::write(
            dir.join("rules.toml"),
            format!(
                "[sinks.events]\ntype = \"file\"\npath = \"events/{{topic.3}}.jsonl\"\n\
                 [sinks.records]\ntype = \"file\"\npath = \"records/{{agent}}/{{stream}}.jsonl\"\n\
                 [[rules]]\nname = \"broker-events\"\nfrom = [\"fleet/server/#\"]\nto = [\"events\"]\n\
                 [[rules]]\nname = \"telemetry\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"records\"]\n\
                 {more_rules}"
            ),
        )
        .unwrap();
        let admin = match extra.contains("[admin]") {
            true => String::new(),
            false => super::admin_table(),
        };
        let config = format!(
            "data_dir = \"data\"\n{admin}[rules]\nfile = \"rules.toml\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n\
             {extra}\n[broker.security]\nenforce = {enforce}\n"
        );
        let proc = ServeProc::start(dir, &config, move || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Secured {
            dir: dir.to_path_buf(),
            port,
            proc,
        }
    }

    /// `fleetbus agents ARGS --data-dir data`, which must succeed; its stdout.
    pub fn agents(&self, args: &[&str]) -> String {
        let args: Vec<&str> = std::iter::once("agents")
            .chain(args.iter().copied())
            .collect();
        super::fleetbus_with_data(&self.dir.join("data"), &args)
    }

    /// The records of (agent, stream) the `records` sink wrote so far.
    pub fn records(&self, agent: &str, stream: &str) -> Vec<serde_json::Value> {
        let path = self
            .dir
            .join(format!("data/records/{agent}/{stream}.jsonl"));
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The dead letters in the built-in dead-letter sink (`data/dead-letters/*.jsonl`).
    pub fn dead_letters(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.dir.join("data/dead-letters")) else {
            return out;
        };
        for e in entries.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
        out
    }

    /// Waits until (agent, stream) has at least `n` records; panics with the server log.
    pub fn wait_records(&self, agent: &str, stream: &str, n: usize) {
        assert!(
            poll_until(Duration::from_secs(10), || self
                .records(agent, stream)
                .len()
                >= n),
            "{agent}/{stream}: {} of {n} records arrived\n{}",
            self.records(agent, stream).len(),
            self.proc.log()
        );
    }

    /// Enrolls `id` and returns its token.
    pub fn enroll(&self, id: &str, extra: &[&str]) -> String {
        let mut args = vec!["enroll", id];
        args.extend_from_slice(extra);
        self.agents(&args).trim().to_string()
    }

    /// The broker events of `kind` (`violation`, `refused`, `connected`, ...) so far.
    pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        let path = self.dir.join(format!("data/events/{kind}.jsonl"));
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v.get("payload").cloned().unwrap_or(v))
            .collect()
    }

    pub fn wait_event(&self, kind: &str, what: impl Fn(&serde_json::Value) -> bool) {
        assert!(
            poll_until(Duration::from_secs(10), || self
                .events(kind)
                .iter()
                .any(&what)),
            "no matching `{kind}` event; have {:?}\n{}",
            self.events(kind),
            self.proc.log()
        );
    }
}

pub fn options(port: u16, id: &str, token: Option<&str>) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_keep_alive(Duration::from_secs(5));
    if let Some(token) = token {
        o.set_credentials(id, token);
    }
    o
}

/// A connected client. Retried for a few seconds: a running server notices new
/// enrollments by polling its credential store.
pub async fn connect(port: u16, id: &str, token: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (client, mut events) = AsyncClient::new(options(port, id, Some(token)), 64);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return (client, events),
                Ok(Ok(_)) => {}
                Ok(Err(ConnectionError::ConnectionRefused(code)))
                    if tokio::time::Instant::now() < deadline =>
                {
                    let _ = code;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                other => panic!("{id} did not connect: {other:?}"),
            }
        }
    }
}

/// The first CONNECT outcome of `id` with `token`.
pub async fn connect_result(
    port: u16,
    id: &str,
    token: Option<&str>,
) -> Result<(), ConnectionError> {
    super::first_connect_outcome(options(port, id, token)).await
}

/// Polls until the connection fails (true) or `within` passes (false).
pub async fn disconnected(events: &mut rumqttc::EventLoop, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            if events.poll().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// Starts `fleetbus rules run` against the broker on `port` with `rules` (TOML, written to
/// `dir/NAME.toml`), data in `dir/NAME-data`, client id `NAME` and `extra` arguments; waits
/// until it is subscribed. Returns the process and its data directory.
pub fn rules_worker(
    dir: &Path,
    port: u16,
    name: &str,
    rules: &str,
    extra: &[&str],
) -> (super::Proc, PathBuf) {
    let rules_file = dir.join(format!("{name}.toml"));
    fs::write(&rules_file, rules).unwrap();
    let data = dir.join(format!("{name}-data"));
    let broker = format!("mqtt://127.0.0.1:{port}");
    let mut args = vec![
        "rules",
        "run",
        "--broker",
        &broker,
        "--rules",
        rules_file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--client-id",
        name,
    ];
    args.extend_from_slice(extra);
    let worker = super::Proc::start(&args, &dir.join(format!("{name}.log")));
    assert!(
        poll_until(Duration::from_secs(10), || worker
            .log_text()
            .contains("rules engine connected")),
        "{}",
        worker.log_text()
    );
    (worker, data)
}

/// Writes the configuration of agent `id` (group `edge`, heartbeats every 50 ms, no
/// metrics) that enrolls itself with bootstrap credential `provision-edge` whose token is
/// in `boot_file`; returns its path.
pub fn bootstrap_agent_config(dir: &Path, port: u16, id: &str, boot_file: &Path) -> PathBuf {
    let config = dir.join(format!("{id}.toml"));
    fs::write(
        &config,
        format!(
            "server = \"mqtt://127.0.0.1:{port}\"\nstate_dir = \"state-{id}\"\nid = \"{id}\"\n\
             groups = [\"edge\"]\n[metrics]\nenabled = false\n[heartbeat]\nenabled = true\n\
             interval = \"50ms\"\n[connection]\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n\
             bootstrap_id = \"provision-edge\"\nbootstrap_token_file = \"{}\"\n",
            boot_file.display()
        ),
    )
    .unwrap();
    config
}

/// A client connected with `options` (its first CONNECT must be accepted).
pub async fn connected(options: MqttOptions) -> (AsyncClient, rumqttc::EventLoop) {
    let id = options.client_id();
    let (client, mut events) = AsyncClient::new(options, 64);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return (client, events),
            Ok(Ok(_)) => {}
            other => panic!("{id} did not connect: {other:?}"),
        }
    }
}

/// A sequenced JSON record as an agent's outbox would send it.
pub fn record(seq: u64) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"epoch":1,"ts":"2026-12-01T00:00:00Z","value":{seq}}}"#).into_bytes()
}

/// Connects (with `token` if given), publishes records `seqs` on `fleet/{id}/telemetry/{stream}`
/// at QoS 1 and waits until the broker acknowledged them all.
pub async fn publish_records(
    port: u16,
    id: &str,
    token: Option<&str>,
    stream: &str,
    seqs: std::ops::RangeInclusive<u64>,
) {
    let (client, mut events) = match token {
        Some(t) => connect(port, id, t).await,
        None => connected(options(port, id, None)).await,
    };
    let topic = format!("fleet/{id}/telemetry/{stream}");
    let want = seqs.clone().count();
    for seq in seqs {
        client
            .publish(&topic, rumqttc::QoS::AtLeastOnce, false, record(seq))
            .await
            .unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while acked < want {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = events.poll().await {
                acked += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: {acked} of {want} publishes acknowledged"));
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
}

/// Publishes received by `events` within `within`, by topic.
pub async fn received(events: &mut rumqttc::EventLoop, within: Duration) -> Vec<String> {
    let mut topics = Vec::new();
    let _ = tokio::time::timeout(within, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => topics.push(p.topic.clone()),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    topics
}

pub fn refused_with(result: Result<(), ConnectionError>, code: ConnectReturnCode) {
    match result {
        Err(ConnectionError::ConnectionRefused(c)) if c == code => {}
        other => panic!("expected refusal {code:?}, got {other:?}"),
    }
}
