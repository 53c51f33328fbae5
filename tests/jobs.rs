//! End to end: jobs pushed through a real `fleetbus serve` process (admin API, signed
//! commands over the embedded broker, SQLite ledger) to in-process agents that run them.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{free_port, ServeProc};
use fleetbus_agent::job_runner::{HandlerConfig, JobRunner};
use fleetbus_agent::{Agent, AgentConfig};
use fleetbus_jobs::{JobReport, JobState, PushRequest, Rollout};
use fleetbus_protocol::{ExecutionState, JobTarget};
use tokio::sync::watch;

/// A server process with a job signing key and an admin endpoint.
struct Server {
    port: u16,
    admin: String,
    /// `Authorization` header value of an operator credential.
    operator: String,
    public_key: String,
    proc: ServeProc,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let port = free_port();
        let admin_port = free_port();
        let keys = dir.join("keys");
        let out = std::process::Command::new(common::bin())
            .args(["keys", "generate", "--out", keys.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public_key = fs::read_to_string(keys.join("job-signing.pub"))
            .unwrap()
            .trim()
            .to_string();
        fs::write(
            dir.join("rules.toml"),
            "[sinks.audit]\ntype = \"file\"\npath = \"audit/{agent}.jsonl\"\n\
             [[rules]]\nname = \"job-audit\"\nfrom = [\"fleet/+/jobs/event\"]\nto = [\"audit\"]\n",
        )
        .unwrap();
        let admin = format!("http://127.0.0.1:{admin_port}");
        let token = common::fleetbus_with_data(
            &dir.join("data"),
            &["agents", "enroll", "ops", "--role", "operator"],
        );
        let proc = ServeProc::start(
            dir,
            &format!(
                "data_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n[rules]\nfile = \"rules.toml\"\n\
                 [jobs]\nsigning_key = \"keys/job-signing.key\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
            ),
            move || std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_ok(),
        );
        Server {
            port,
            admin,
            operator: format!("Bearer {}", token.trim()),
            public_key,
            proc,
        }
    }

    /// A graceful stop and a start on the same data directory.
    fn restart(&mut self) {
        self.proc.terminate();
        self.proc.launch();
    }

    /// Pushes `op` to one agent with default rollout.
    fn push_to(&self, agent: &str, op: &str, args: &[(&str, &str)]) -> String {
        self.push(JobTarget::Agent(agent.into()), op, args, Rollout::default())
    }

    fn push(&self, target: JobTarget, op: &str, args: &[(&str, &str)], rollout: Rollout) -> String {
        self.push_request(target, op, args, rollout, false)
    }

    fn push_request(
        &self,
        target: JobTarget,
        op: &str,
        args: &[(&str, &str)],
        rollout: Rollout,
        allow_empty: bool,
    ) -> String {
        let req = PushRequest {
            target,
            operation: op.into(),
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout_secs: 30,
            rollout,
            allow_empty,
        };
        let report: JobReport = ureq::post(&format!("{}/jobs", self.admin))
            .header("Authorization", &self.operator)
            .send_json(&req)
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        report.job.doc.id
    }

    fn report(&self, id: &str) -> JobReport {
        ureq::get(&format!("{}/jobs/{id}", self.admin))
            .header("Authorization", &self.operator)
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    }

    /// Waits until `cond` holds for the job's report.
    async fn wait_for(&self, id: &str, what: &str, cond: impl Fn(&JobReport) -> bool) -> JobReport {
        for _ in 0..300 {
            let r = self.report(id);
            if cond(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{what}: {:#?}", self.report(id).counts);
    }
}

struct TestAgent {
    jobs: JobRunner,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    fn start(dir: &Path, id: &str, groups: &[&str], server: &Server) -> TestAgent {
        let mut config = AgentConfig {
            server: format!("mqtt://127.0.0.1:{}", server.port).parse().unwrap(),
            state_dir: dir.join(format!("state-{id}")),
            id: Some(id.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..AgentConfig::default()
        };
        config.metrics.enabled = false;
        config.heartbeat.enabled = false;
        config.connection.backoff_min = Duration::from_millis(100);
        config.connection.backoff_max = Duration::from_millis(500);
        config.jobs.public_key = Some(server.public_key.clone());
        config.jobs.handlers.insert(
            "fail".into(),
            HandlerConfig::new(&["sh", "-c", "exit 3"], &[], Duration::from_secs(5)),
        );
        config.jobs.handlers.insert(
            "complain".into(),
            HandlerConfig::new(
                &[
                    "sh",
                    "-c",
                    "echo 'System has not been booted with systemd as init system (PID 1).' >&2; echo 'Failed to connect to bus' >&2; exit 1",
                ],
                &[],
                Duration::from_secs(5),
            ),
        );
        config.jobs.handlers.insert(
            "slow".into(),
            HandlerConfig::new(
                &["sleep", "{secs}"],
                &[("secs", "[0-9]+")],
                Duration::from_secs(1),
            ),
        );
        let agent = Agent::open(fleetbus_agent::Valid::new(config).unwrap()).unwrap();
        let jobs = agent.jobs().clone();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            agent.run(rx).await.unwrap();
        });
        TestAgent { jobs, stop, task }
    }

    fn started(&self) -> u64 {
        self.jobs.counters().started.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn count(r: &JobReport, s: ExecutionState) -> usize {
    r.counts.get(&s).copied().unwrap_or(0)
}

/// Waits until the agents the admin endpoint lists at `query` (`""` or `?group=G`) satisfy
/// `cond`, as `fleetbus agents list` shows them.
async fn wait_known(
    server: &Server,
    query: &str,
    what: &str,
    cond: impl Fn(&[fleetbus_jobs::KnownAgent]) -> bool,
) {
    let url = format!("{}/agents{query}", server.admin);
    for _ in 0..200 {
        let known: Option<Vec<fleetbus_jobs::KnownAgent>> = ureq::get(&url)
            .header("Authorization", &server.operator)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok());
        if known.is_some_and(|k| cond(&k)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server does not know {what}");
}

/// Waits until the server knows agent `id` online (pushing to an agent the server has never
/// heard of is refused).
async fn agent_known(server: &Server, id: &str) {
    wait_known(server, "", id, |k| {
        k.iter().any(|a| a.agent == id && a.online)
    })
    .await
}

/// Waits until the server knows `n` members of `group` from their birth messages.
async fn members_known(server: &Server, group: &str, n: usize) {
    let query = format!("?group={group}");
    let what = format!("{n} members of {group}");
    wait_known(server, &query, &what, |k| {
        k.iter().filter(|a| a.online).count() >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_job_reaches_twenty_agents_once_including_three_started_later() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut agents = Vec::new();
    for i in 0..17 {
        agents.push(TestAgent::start(
            dir.path(),
            &format!("web-{i:02}"),
            &["web", "eu"],
            &server,
        ));
    }
    members_known(&server, "web", 17).await;
    // three members connected once (the server knows them) and are offline at push time
    let once: Vec<TestAgent> = (17..20)
        .map(|i| TestAgent::start(dir.path(), &format!("web-{i:02}"), &["web"], &server))
        .collect();
    members_known(&server, "web", 20).await;
    for a in once {
        a.stop().await;
    }
    wait_known(&server, "?group=web", "20 members, 17 online", |k| {
        k.len() == 20 && k.iter().filter(|a| a.online).count() == 17
    })
    .await;
    let id = server.push(
        JobTarget::Group("web".into()),
        "echo",
        &[("msg", "hello")],
        Rollout::default(),
    );
    // they get the job when they connect again (the job stays active until they report)
    for i in 17..20 {
        agents.push(TestAgent::start(
            dir.path(),
            &format!("web-{i:02}"),
            &["web"],
            &server,
        ));
    }
    let r = server
        .wait_for(&id, "all 20 succeeded", |r| {
            count(r, ExecutionState::Succeeded) == 20
        })
        .await;
    assert_eq!(r.total(), 20);
    assert_eq!(r.job.state, JobState::Done);
    assert!(
        r.executions.iter().all(|e| e.output == "msg=hello"),
        "{:?}",
        r.executions
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in &agents {
        assert_eq!(a.started(), 1, "each agent runs the job exactly once");
    }
    // state changes went through the rules engine to the audit sink
    let audit = dir.path().join("data/audit/web-00.jsonl");
    assert!(
        common::poll_until(Duration::from_secs(10), || fs::read_to_string(&audit)
            .is_ok_and(|t| t.contains("SUCCEEDED"))),
        "no job event in the audit sink"
    );
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pushed_before_a_server_restart_reaches_agents_that_connect_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    // the agents are known (they connected once) and offline at push time
    let a = TestAgent::start(dir.path(), "db-1", &["db"], &server);
    let b = TestAgent::start(dir.path(), "db-2", &["db"], &server);
    members_known(&server, "db", 2).await;
    a.stop().await;
    b.stop().await;
    let id = server.push(
        JobTarget::Group("db".into()),
        "echo",
        &[],
        Rollout::default(),
    );
    server.restart(); // rumqttd keeps nothing: delivery must come from the ledger
    let a = TestAgent::start(dir.path(), "db-1", &["db"], &server);
    let b = TestAgent::start(dir.path(), "db-2", &["db"], &server);
    server
        .wait_for(&id, "both succeeded", |r| {
            count(r, ExecutionState::Succeeded) == 2
        })
        .await;
    assert_eq!(a.started() + b.started(), 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_rejections_and_the_abort_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let one = TestAgent::start(dir.path(), "solo", &[], &server);
    agent_known(&server, "solo").await;

    // a handler running past its timeout is killed: TIMED_OUT
    let id = server.push_to("solo", "slow", &[("secs", "30")]);
    let r = server
        .wait_for(&id, "timed out", |r| {
            count(r, ExecutionState::TimedOut) == 1
        })
        .await;
    assert!(
        r.executions[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("ran longer than 1s; its processes were sent SIGTERM"),
        "{:?}",
        r.executions
    );
    // unknown operation, argument failing its pattern: REJECTED with the reason
    let id = server.push_to("solo", "format-disk", &[]);
    let r = server
        .wait_for(&id, "rejected", |r| count(r, ExecutionState::Rejected) == 1)
        .await;
    assert!(r.executions[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("unknown operation"));
    let id = server.push_to("solo", "slow", &[("secs", "1; rm -rf /")]);
    let r = server
        .wait_for(&id, "rejected", |r| count(r, ExecutionState::Rejected) == 1)
        .await;
    assert!(r.executions[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("does not match"));
    assert_eq!(one.started(), 1, "only the slow job ran");

    // abort: 4 members known, 2 online; both fail -> the 2 not started are CANCELED
    let mut online = Vec::new();
    for i in 0..4 {
        online.push(TestAgent::start(
            dir.path(),
            &format!("batch-{i}"),
            &["batch"],
            &server,
        ));
    }
    members_known(&server, "batch", 4).await;
    for a in online.drain(2..) {
        a.stop().await;
    }
    let rollout = Rollout {
        max_per_minute: None,
        abort_failure_pct: Some(50.0),
        abort_min_finished: 2,
    };
    let id = server.push(JobTarget::Group("batch".into()), "fail", &[], rollout);
    let r = server
        .wait_for(&id, "aborted", |r| r.job.state == JobState::Aborted)
        .await;
    assert_eq!(count(&r, ExecutionState::Failed), 2, "{:?}", r.counts);
    assert_eq!(count(&r, ExecutionState::Canceled), 2, "{:?}", r.counts);
    for a in online {
        a.stop().await;
    }
    one.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_the_signing_key_is_rejected_by_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let agents: Vec<TestAgent> = (0..3)
        .map(|i| TestAgent::start(dir.path(), &format!("edge-{i}"), &["edge"], &server))
        .collect();
    members_known(&server, "edge", 3).await;
    // a rogue client signs with its own key and publishes straight to the group topic
    let rogue_key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let job = fleetbus_protocol::JobDocument {
        id: "rogue-1".into(),
        operation: "echo".into(),
        args: Default::default(),
        timeout_secs: 5,
        created: chrono::Utc::now(),
        target: JobTarget::Group("edge".into()),
    };
    let payload = fleetbus_protocol::JobCommand::Run {
        job,
        expires: chrono::Utc::now() + chrono::Duration::seconds(600),
    }
    .sign(&rogue_key)
    .unwrap()
    .encode()
    .unwrap();
    let mut opts = rumqttc::MqttOptions::new("rogue", "127.0.0.1", server.port);
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(
            fleetbus_protocol::jobs::group_notify("edge"),
            rumqttc::QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
    // garbage on the group topic, and a status report the server cannot read
    client
        .publish(
            fleetbus_protocol::jobs::group_notify("edge"),
            rumqttc::QoS::AtLeastOnce,
            false,
            b"not a command".to_vec(),
        )
        .await
        .unwrap();
    client
        .publish(
            fleetbus_protocol::jobs::status("edge-0"),
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{\"job_id\": 5}".to_vec(),
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut acked = 0;
        while acked < 3 {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = eventloop.poll().await
            {
                acked += 1;
            }
        }
    })
    .await;
    for a in &agents {
        let rejected = common::poll_until(Duration::from_secs(10), || {
            a.jobs.counters().rejected.load(Ordering::Relaxed) >= 2
        });
        assert!(
            rejected,
            "an agent did not reject the forged job and the garbage"
        );
        assert_eq!(a.started(), 0, "nothing executed");
        assert!(
            a.jobs.status("rogue-1").is_none(),
            "a forged id is not remembered"
        );
    }
    assert!(
        common::poll_until(Duration::from_secs(5), || server
            .proc
            .log()
            .contains("unreadable job status ignored")),
        "the unreadable status report was not reported"
    );
    // and the server still works
    assert_eq!(
        server
            .report(&server.push_to("edge-1", "echo", &[]))
            .total(),
        1
    );
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_job_does_not_run_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let a = TestAgent::start(dir.path(), "k1", &[], &server);
    agent_known(&server, "k1").await;
    let id = server.push_to("k1", "slow", &[("secs", "0")]);
    server
        .wait_for(&id, "succeeded", |r| {
            count(r, ExecutionState::Succeeded) == 1
        })
        .await;
    // a second job is killed with the agent while it runs
    let id2 = server.push_to("k1", "slow", &[("secs", "5")]);
    server
        .wait_for(&id2, "in progress", |r| {
            count(r, ExecutionState::InProgress) == 1
        })
        .await;
    a.task.abort(); // like a kill: no goodbye
    let _ = a.task.await;
    // the restarted agent is sent the pending job again (birth message) and answers from
    // its record: FAILED (interrupted), not run again; the finished one is not run either
    let b = TestAgent::start(dir.path(), "k1", &[], &server);
    let r = server
        .wait_for(&id2, "reported failed", |r| {
            count(r, ExecutionState::Failed) == 1
        })
        .await;
    assert!(
        r.executions[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("interrupted"),
        "{:?}",
        r.executions
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.started(), 0, "nothing ran again after the restart");
    assert_eq!(
        b.jobs.status(&id).map(|s| s.state),
        Some(ExecutionState::Succeeded)
    );
    b.stop().await;
}

/// `fleetbus bench jobs` end to end on a small fleet: every simulated agent connects,
/// receives the signed group job and reports it; the run fails unless the ledger shows
/// every target SUCCEEDED.
#[test]
fn the_jobs_benchmark_runs_a_small_fleet_to_completion() {
    // through `fleetbus bench`, which hands over to the `fleetbus-bench` binary beside it
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetbus"))
        .args(["bench", "jobs", "--agents", "30", "--deadline", "60s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |what: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no `{what}` in:\n{stdout}"))
            .to_string()
    };
    assert!(line("simulated agents").ends_with(" 30"), "{stdout}");
    assert!(line("status reports sent").ends_with(" 90"), "{stdout}");
    assert!(line("push -> ledger shows every target SUCCEEDED").ends_with(" ms"));
}

/// The server's signing key (what a captured command was signed with).
fn server_key(dir: &Path) -> ed25519_dalek::SigningKey {
    let hex = fs::read_to_string(dir.join("keys/job-signing.key")).unwrap();
    let bytes: [u8; 32] = hex::decode(hex.trim()).unwrap().try_into().unwrap();
    ed25519_dalek::SigningKey::from_bytes(&bytes)
}

/// Publishes `command`, signed with `key`, on `topic` and waits for the broker's ack.
async fn publish_command(
    port: u16,
    topic: &str,
    command: &fleetbus_protocol::JobCommand,
    key: &ed25519_dalek::SigningKey,
) {
    let payload = command.sign(key).unwrap().encode().unwrap();
    let mut opts = rumqttc::MqttOptions::new("replayer", "127.0.0.1", port);
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = eventloop.poll().await
            {
                return;
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
}

/// Hardening finding 12: captured job commands replayed from the wire. An expired command
/// (signed with the real key, captured earlier) is not run by a new group member; a job
/// the server cancelled is not run after the agent restarts, however often its command is
/// replayed; an execution the ledger did not send is recorded when it is reported; a job
/// too large for the broker is refused at push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_commands_run_nothing_the_ledger_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let key = server_key(dir.path());
    let newcomer = TestAgent::start(dir.path(), "edge-new", &["edge"], &server);
    members_known(&server, "edge", 1).await;
    let doc = |id: &str, target: JobTarget| fleetbus_protocol::JobDocument {
        id: id.into(),
        operation: "echo".into(),
        args: Default::default(),
        timeout_secs: 5,
        created: chrono::Utc::now(),
        target,
    };
    // an old group command, captured an hour ago: expired, not run, not reported
    let old = fleetbus_protocol::JobCommand::Run {
        job: doc("captured-1", JobTarget::Group("edge".into())),
        expires: chrono::Utc::now() - chrono::Duration::seconds(3600),
    };
    let notify = fleetbus_protocol::jobs::group_notify("edge");
    publish_command(server.port, &notify, &old, &key).await;
    assert!(common::poll_until(Duration::from_secs(5), || {
        newcomer.jobs.counters().rejected.load(Ordering::Relaxed) >= 1
    }));
    assert_eq!(newcomer.started(), 0);
    assert!(newcomer.jobs.status("captured-1").is_none());

    // a cancelled job: the agent remembers the cancel across a restart
    let cancel = fleetbus_protocol::JobCommand::Cancel {
        job_id: "cancelled-1".into(),
        ts: chrono::Utc::now(),
    };
    let own = fleetbus_protocol::jobs::agent_notify("edge-new");
    publish_command(server.port, &own, &cancel, &key).await;
    assert!(common::poll_until(Duration::from_secs(5), || {
        newcomer
            .jobs
            .status("cancelled-1")
            .is_some_and(|s| s.state == ExecutionState::Canceled)
    }));
    newcomer.stop().await;
    let newcomer = TestAgent::start(dir.path(), "edge-new", &["edge"], &server);
    members_known(&server, "edge", 1).await;
    let replay = fleetbus_protocol::JobCommand::Run {
        job: doc("cancelled-1", JobTarget::Agent("edge-new".into())),
        expires: chrono::Utc::now() + chrono::Duration::seconds(600),
    };
    publish_command(server.port, &own, &replay, &key).await;
    assert!(common::poll_until(Duration::from_secs(5), || {
        newcomer.jobs.counters().repeated.load(Ordering::Relaxed) >= 1
    }));
    assert_eq!(newcomer.started(), 0, "a cancelled job ran after a restart");

    // a group job pushed while the group had no member, then cancelled: its command,
    // captured and replayed within its validity to an agent that joined the group later,
    // runs there, and the ledger records that execution instead of ignoring its report
    let id = server.push_request(
        JobTarget::Group("db".into()),
        "echo",
        &[],
        Rollout::default(),
        true,
    );
    ureq::post(&format!("{}/jobs/{id}/cancel", server.admin))
        .header("Authorization", &server.operator)
        .send_json(serde_json::json!({}))
        .unwrap();
    let pushed = server.report(&id);
    assert!(pushed.executions.is_empty());
    assert_eq!(pushed.job.state, JobState::Canceled);
    let late = TestAgent::start(dir.path(), "db-late", &["db"], &server);
    members_known(&server, "db", 1).await;
    let replay = fleetbus_protocol::JobCommand::Run {
        job: server.report(&id).job.doc,
        expires: chrono::Utc::now() + chrono::Duration::seconds(600),
    };
    publish_command(
        server.port,
        &fleetbus_protocol::jobs::group_notify("db"),
        &replay,
        &key,
    )
    .await;
    let report = server
        .wait_for(&id, "the replayed execution recorded", |r| {
            r.executions
                .iter()
                .any(|e| e.agent == "db-late" && e.state == ExecutionState::Succeeded)
        })
        .await;
    assert_eq!(late.started(), 1);
    assert_eq!(report.executions.len(), 1, "{:?}", report.executions);
    late.stop().await;

    // a document too large for the broker is refused at push
    let big = "x".repeat(100 * 1024);
    let req = PushRequest {
        target: JobTarget::Agent("edge-new".into()),
        operation: "echo".into(),
        args: [("blob".to_string(), big)].into_iter().collect(),
        timeout_secs: 30,
        rollout: Rollout::default(),
        allow_empty: true,
    };
    let response = ureq::post(&format!("{}/jobs", server.admin))
        .header("Authorization", &server.operator)
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(&req)
        .unwrap();
    assert_eq!(response.status(), 400);
    newcomer.stop().await;
}

/// `fleetbus job ...` / `agents ...` against the server: (exit code, stdout, stderr).
fn cli(server: &Server, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(common::bin())
        .args(args)
        .env("FLEETBUS_ADMIN", &server.admin)
        .env(
            "FLEETBUS_ADMIN_TOKEN",
            server.operator.trim_start_matches("Bearer "),
        )
        .env_remove("FLEETBUS_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_command_ends_and_its_exit_code_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let web = TestAgent::start(dir.path(), "web-1", &["web"], &server);
    let ghost = TestAgent::start(
        dir.path(),
        "ghost-0123456789-0123456789-0123456",
        &["web"],
        &server,
    );
    members_known(&server, "web", 2).await;
    ghost.stop().await;

    // a group nobody is in: refused at once, nothing waits
    let started = std::time::Instant::now();
    let (code, out, err) = cli(
        &server,
        &["job", "push", "--group", "nosuch", "--op", "echo", "--wait"],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("group `nosuch` has no known member"), "{err}");
    assert!(err.contains("--allow-empty"), "{err}");
    let (code, _, err) = cli(
        &server,
        &["job", "push", "--agent", "nobody-here", "--op", "echo"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("no agent `nobody-here` is known"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // allowed in, an unknown agent stays QUEUED: --wait stops at its deadline, shows the
    // table so far and exits 2
    let (code, out, err) = cli(
        &server,
        &[
            "job",
            "push",
            "--agent",
            "nobody-here",
            "--op",
            "echo",
            "--allow-empty",
            "--wait",
            "--wait-timeout",
            "2s",
        ],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("nobody-here") && out.contains("QUEUED"),
        "{out}"
    );
    assert!(err.contains("stopped waiting after 2s"), "{err}");
    let queued_job = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();

    // a failing job: exit 1 from push --wait and from status, and the output column
    // shows the line that says why (not a stream marker)
    let (code, out, err) = cli(
        &server,
        &[
            "job", "push", "--agent", "web-1", "--op", "complain", "--wait",
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("System has not been booted with systemd as init system"),
        "{out}"
    );
    assert!(!out.contains("[stderr]"), "{out}");
    let failed_job = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let (code, out, _) = cli(&server, &["job", "status", &failed_job]);
    assert_eq!(code, 1, "{out}");
    let (code, _, _) = cli(
        &server,
        &["job", "push", "--agent", "web-1", "--op", "echo", "--wait"],
    );
    assert_eq!(code, 0);

    // a group job while one member is gone for good: forgetting it ends the job; the
    // columns stay aligned with a long agent id
    let (code, out, _) = cli(&server, &["job", "push", "--group", "web", "--op", "echo"]);
    assert_eq!(code, 0, "{out}");
    let group_job = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    server
        .wait_for(&group_job, "web-1 succeeded", |r| {
            count(r, ExecutionState::Succeeded) == 1
        })
        .await;
    let (_, out, _) = cli(&server, &["agents", "list"]);
    let header = out.lines().next().unwrap();
    let row = out.lines().find(|l| l.starts_with("web-1 ")).unwrap();
    assert_eq!(header.find("online"), row.find("yes"), "{out}");
    let (code, out, err) = cli(
        &server,
        &["agents", "forget", "ghost-0123456789-0123456789-0123456"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed from 1 active job"), "{out}");
    let r = server
        .wait_for(&group_job, "done", |r| {
            r.job.state == fleetbus_jobs::JobState::Done
        })
        .await;
    assert_eq!(r.total(), 1);
    let (_, out, _) = cli(&server, &["agents", "list"]);
    assert!(!out.contains("ghost"), "{out}");
    let (code, _, err) = cli(
        &server,
        &["agents", "forget", "ghost-0123456789-0123456789-0123456"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("no agent"), "{err}");
    // the job queued for an agent never seen ends when that id is forgotten, too
    let (code, _, err) = cli(&server, &["agents", "forget", "nobody-here"]);
    assert_eq!(code, 0, "{err}");
    server
        .wait_for(&queued_job, "done", |r| {
            r.job.state == fleetbus_jobs::JobState::Done
        })
        .await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registry_works_without_a_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    let token = common::fleetbus_with_data(
        &dir.path().join("data"),
        &["agents", "enroll", "ops", "--role", "operator"],
    );
    let proc = ServeProc::start(
        dir.path(),
        &format!(
            "data_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
        ),
        move || std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_ok(),
    );
    let mut config = AgentConfig {
        server: format!("mqtt://127.0.0.1:{port}").parse().unwrap(),
        state_dir: dir.path().join("state"),
        id: Some("lone-1".into()),
        groups: vec!["edge".into()],
        ..AgentConfig::default()
    };
    config.metrics.enabled = false;
    config.heartbeat.enabled = false;
    let agent = Agent::open(fleetbus_agent::Valid::new(config).unwrap()).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { agent.run(rx).await.unwrap() });
    let server = Server {
        port,
        admin: format!("http://127.0.0.1:{admin_port}"),
        operator: format!("Bearer {}", token.trim()),
        public_key: String::new(),
        proc,
    };
    members_known(&server, "edge", 1).await;
    let (code, out, err) = cli(&server, &["agents", "list", "--group", "edge"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("lone-1"), "{out}");
    let (code, _, err) = cli(&server, &["job", "push", "--group", "edge", "--op", "echo"]);
    assert_ne!(code, 0);
    assert!(err.contains("the job service is off"), "{err}");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;

    // an operator's tool holding an idle keep-alive connection does not hold up a stop
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
    use std::io::{Read, Write};
    write!(
        idle,
        "GET /agents HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\nAuthorization: {}\r\n\r\n",
        server.operator
    )
    .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut server = server;
    let stopping = std::time::Instant::now();
    server.proc.terminate();
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "stopping took {:?} with an idle admin connection open",
        stopping.elapsed()
    );
}
