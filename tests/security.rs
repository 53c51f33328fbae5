//! End to end: a `fleetbus serve` process with `[broker.security] enforce = true`,
//! credentials made with `fleetbus agents enroll/revoke`, raw MQTT clients (rumqttc) and a
//! real agent process. Broker events are routed by a rule into a file sink and read back;
//! metric points into a real InfluxDB.

mod common;

use std::fs;
use std::time::Duration;

use common::secured::{
    connect, connect_result, disconnected, options, received, refused_with, Secured,
};
use common::{poll_until, Proc};
use fleetbus_testkit::influxdb::Influxd;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, Packet, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_agent_is_disconnected_and_nothing_it_sent_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let rogue_token = server.enroll("web-01", &["--groups", "web"]);
    let ops_token = server.enroll("ops", &["--role", "server"]);
    let port = server.port;

    // a server-role client watching the whole fleet sees what is delivered
    let (ops, mut ops_events) = connect(port, "ops", &ops_token).await;
    ops.subscribe("fleet/#", QoS::AtLeastOnce).await.unwrap();
    let _ = received(&mut ops_events, Duration::from_millis(300)).await;

    // what the agent may do is delivered (the observer works)
    let (web, mut web_events) = connect(port, "web-01", &rogue_token).await;
    web.publish(
        "fleet/web-01/telemetry/probe",
        QoS::AtLeastOnce,
        false,
        b"x".to_vec(),
    )
    .await
    .unwrap();
    let _ = received(&mut web_events, Duration::from_millis(300)).await;
    let seen = received(&mut ops_events, Duration::from_secs(1)).await;
    assert!(
        seen.contains(&"fleet/web-01/telemetry/probe".to_string()),
        "{seen:?}"
    );

    // three forbidden acts, each on a fresh connection: each one ends it
    let acts: [(&str, &str); 3] = [
        ("publish", "fleet/web-02/telemetry/metrics"),
        ("subscribe", "fleet/#"),
        ("publish", "fleet/groups/web/jobs/notify"),
    ];
    for (action, topic) in acts {
        let (client, mut events) = connect(port, "web-01", &rogue_token).await;
        match action {
            "publish" => client
                .publish(topic, QoS::AtLeastOnce, false, b"forged".to_vec())
                .await
                .unwrap(),
            _ => client.subscribe(topic, QoS::AtLeastOnce).await.unwrap(),
        }
        assert!(
            disconnected(&mut events, Duration::from_secs(5)).await,
            "{action} {topic}: still connected"
        );
        server.wait_event("violation", |e| {
            e["client_id"] == "web-01" && e["action"] == action && e["topic"] == topic
        });
    }
    let seen = received(&mut ops_events, Duration::from_secs(1)).await;
    assert!(
        seen.iter()
            .all(|t| !t.contains("web-02") && !t.contains("groups")),
        "a forbidden publish was delivered: {seen:?}"
    );
    // the disconnect says why
    server.wait_event("disconnected", |e| {
        e["client_id"] == "web-01"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("policy violation"))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_the_right_code_and_revocation_drops_the_live_connection()
{
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let token = server.enroll("db-01", &[]);
    let other = server.enroll("db-02", &[]);
    let port = server.port;
    // both known to the server
    drop(connect(port, "db-01", &token).await);
    drop(connect(port, "db-02", &other).await);

    refused_with(
        connect_result(port, "db-01", Some("0000")).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    refused_with(
        connect_result(port, "db-01", Some(&other)).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    refused_with(
        connect_result(port, "db-01", None).await,
        ConnectReturnCode::BadUserNamePassword,
    );
    refused_with(
        connect_result(port, "nobody", Some(&token)).await,
        ConnectReturnCode::NotAuthorized,
    );
    server.wait_event("refused", |e| e["client_id"] == "nobody" && e["code"] == 5);
    connect_result(port, "db-01", Some(&token)).await.unwrap();

    // revoked while connected: dropped within a few seconds, then refused
    let (_client, mut events) = connect(port, "db-01", &token).await;
    server.agents(&["revoke", "db-01"]);
    assert!(
        disconnected(&mut events, Duration::from_secs(5)).await,
        "the revoked client is still connected"
    );
    refused_with(
        connect_result(port, "db-01", Some(&token)).await,
        ConnectReturnCode::NotAuthorized,
    );
    server.wait_event("disconnected", |e| {
        e["client_id"] == "db-01" && e["reason"].as_str().is_some_and(|r| r.contains("revoked"))
    });
    // the other client is unaffected
    connect_result(port, "db-02", Some(&other)).await.unwrap();
    let listing = server.agents(&["credentials"]);
    assert!(
        listing.contains("db-01") && listing.contains("UTC"),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_process_delivers_and_two_clones_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let token_file = dir.path().join("edge-1.token");
    server.enroll(
        "edge-1",
        &["--groups", "edge", "--out", token_file.to_str().unwrap()],
    );
    // a real agent with its token file: its records arrive, its job subscriptions pass
    let agent_config = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        fs::write(
            &path,
            format!(
                "server = \"mqtt://127.0.0.1:{}\"\nstate_dir = \"state-{name}\"\nid = \"edge-1\"\n\
                 groups = [\"edge\"]\n[metrics]\nenabled = false\n[heartbeat]\nenabled = true\n\
                 interval = \"50ms\"\n[connection]\nbackoff_min = \"100ms\"\nbackoff_max = \"300ms\"\n\
                 token_file = \"{}\"\n",
                server.port,
                token_file.display()
            ),
        )
        .unwrap();
        path
    };
    let first = agent_config("first");
    let mut a = Proc::start(
        &["agent", "--config", first.to_str().unwrap()],
        &dir.path().join("first.log"),
    );
    let records = dir.path().join("data/records/edge-1/heartbeat.jsonl");
    assert!(
        poll_until(Duration::from_secs(15), || fs::read_to_string(&records)
            .is_ok_and(|t| t.lines().count() >= 5)),
        "no heartbeats from the enrolled agent\n{}\n{}",
        a.log_text(),
        server.proc.log()
    );
    assert!(
        server.events("violation").is_empty(),
        "{:?}",
        server.events("violation")
    );
    // a cloned machine starts with the same identity: the two keep taking the session
    // from each other, and the broker says so
    let second = agent_config("second");
    let mut b = Proc::start(
        &["agent", "--config", second.to_str().unwrap()],
        &dir.path().join("second.log"),
    );
    server.wait_event("duplicate-identity", |e| {
        e["client_id"] == "edge-1" && e["takeovers"].as_u64().is_some_and(|n| n >= 3)
    });
    b.kill();
    a.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_enrolls_an_agent_and_can_do_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let boot_file = dir.path().join("bootstrap.token");
    server.enroll(
        "provision-edge",
        &[
            "--role",
            "bootstrap",
            "--groups",
            "edge",
            "--out",
            boot_file.to_str().unwrap(),
        ],
    );
    let boot = fs::read_to_string(&boot_file).unwrap().trim().to_string();
    let port = server.port;

    // logged in with the bootstrap token, publishing telemetry is a violation
    let bootstrap_login = |id: &str| {
        let mut o = options(port, id, None);
        o.set_credentials("provision-edge", boot.clone());
        o
    };
    let (client, mut events) = AsyncClient::new(bootstrap_login("newcomer"), 16);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert!(connected.is_ok(), "the bootstrap login was refused");
    client
        .publish(
            "fleet/newcomer/telemetry/metrics",
            QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
    assert!(disconnected(&mut events, Duration::from_secs(5)).await);
    server.wait_event("violation", |e| e["client_id"] == "newcomer");

    // an agent holding only the bootstrap token enrolls itself and delivers
    let config = common::secured::bootstrap_agent_config(dir.path(), port, "edge-7", &boot_file);
    let records = dir.path().join("data/records/edge-7/heartbeat.jsonl");
    let count = || {
        fs::read_to_string(&records)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let log = dir.path().join("edge-7.log");
    let mut agent = Proc::start(&["agent", "--config", config.to_str().unwrap()], &log);
    assert!(
        poll_until(Duration::from_secs(20), || count() >= 5),
        "no heartbeats from the enrolled agent\n{}\n{}",
        agent.log_text(),
        server.proc.log()
    );
    server.wait_event("enrolled", |e| {
        e["client_id"] == "edge-7" && e["via"] == "provision-edge" && e["groups"][0] == "edge"
    });
    assert!(dir.path().join("state-edge-7/credential.json").is_file());
    let listing = server.agents(&["credentials"]);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("edge-7") && l.contains(" agent ") && l.contains("edge")),
        "{listing}"
    );
    // a restart logs in with the kept credential: no second enrollment
    agent.kill();
    let before = count();
    let mut agent = Proc::start(&["agent", "--config", config.to_str().unwrap()], &log);
    assert!(poll_until(Duration::from_secs(20), || count() >= before + 5));
    assert_eq!(server.events("enrolled").len(), 1);
    assert!(server
        .events("violation")
        .iter()
        .all(|e| e["client_id"] != "edge-7"));
    agent.kill();
    // the bootstrap token cannot take an enrolled id
    match common::first_connect_outcome(bootstrap_login("edge-7")).await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)) => {}
        other => panic!("a bootstrap login for an enrolled id: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_picks_up_a_replaced_token_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let token_file = dir.path().join("edge-2.token");
    server.enroll("edge-2", &["--out", token_file.to_str().unwrap()]);
    let config = dir.path().join("edge-2.toml");
    fs::write(
        &config,
        format!(
            "server = \"mqtt://127.0.0.1:{}\"\nstate_dir = \"state\"\nid = \"edge-2\"\n\
             [metrics]\nenabled = false\n[heartbeat]\nenabled = true\ninterval = \"50ms\"\n\
             [connection]\nbackoff_min = \"100ms\"\nbackoff_max = \"300ms\"\ntoken_file = \"{}\"\n",
            server.port,
            token_file.display()
        ),
    )
    .unwrap();
    let mut agent = Proc::start(
        &["agent", "--config", config.to_str().unwrap()],
        &dir.path().join("agent.log"),
    );
    let records = dir.path().join("data/records/edge-2/heartbeat.jsonl");
    let count = || {
        fs::read_to_string(&records)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert!(
        poll_until(Duration::from_secs(15), || count() >= 3),
        "{}",
        agent.log_text()
    );
    // a new token: the server drops the connection that used the old one, and the agent
    // reconnects with what its token file holds now
    let before = agent.log_text().len();
    server.enroll(
        "edge-2",
        &["--replace", "--out", token_file.to_str().unwrap()],
    );
    assert!(
        poll_until(Duration::from_secs(10), || agent.log_text()[before..]
            .contains("connection to server failed")),
        "the connection with the old token was not dropped:\n{}",
        agent.log_text()
    );
    let dropped_at = count();
    assert!(
        poll_until(Duration::from_secs(15), || count() >= dropped_at + 5),
        "no heartbeats after the token was replaced:\n{}",
        agent.log_text()
    );
    agent.kill();
}

/// The `groups` tag of an agent's InfluxDB points is its credential's groups, whatever its
/// birth message claims: a rogue agent cannot file its metrics under another group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_points_carry_the_credentials_groups_not_those_the_birth_message_claims() {
    let Some(influx) = Influxd::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "[sinks.influx]\ntype = \"influxdb\"\nurl = \"{}\"\ndatabase = \"fleet\"\n\
         create_database = true\n\
         [[rules]]\nname = \"metrics\"\nfrom = [\"fleet/+/telemetry/metrics\"]\nto = [\"influx\"]\n",
        influx.url()
    );
    let server = Secured::start_with_rules(dir.path(), true, "", &rules);
    let token = server.enroll("web-01", &["--groups", "web,linux"]);
    let (client, mut events) = connect(server.port, "web-01", &token).await;
    let birth =
        r#"{"agent":"web-01","status":"online","ts":"2026-12-01T10:00:00Z","groups":["admin"]}"#;
    client
        .publish("fleet/web-01/presence", QoS::AtLeastOnce, false, birth)
        .await
        .unwrap();
    let metric = r#"{"seq":1,"epoch":1,"ts":"2026-12-01T10:00:01Z","metrics":[{"name":"load.1","value":0.5}]}"#;
    client
        .publish(
            "fleet/web-01/telemetry/metrics",
            QoS::AtLeastOnce,
            false,
            metric,
        )
        .await
        .unwrap();
    let _ = received(&mut events, Duration::from_millis(500)).await;

    let mut points = serde_json::Value::Null;
    let arrived = poll_until(Duration::from_secs(15), || {
        let Ok(answer) = influx.query(Some("fleet"), r#"SELECT "value", "groups" FROM "load.1""#)
        else {
            return false;
        };
        points = serde_json::from_str::<serde_json::Value>(&answer).unwrap_or_default()["results"]
            [0]["series"][0]["values"]
            .clone();
        points.is_array()
    });
    assert!(arrived, "no point arrived\n{}", server.proc.log());
    assert_eq!(
        points,
        serde_json::json!([["2026-12-01T10:00:01Z", 0.5, "linux,web"]])
    );
}

/// SIGHUP reloads the topic policy file: a live connection whose grants the new policy
/// changes is dropped and comes back under it (what it may publish is then the new
/// policy's); a broken policy file is refused and the policy in effect stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_topic_policy_and_drops_the_connections_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let policy = |prefix: &str| {
        format!(
            "[[rule]]\nname = \"devices\"\nrole = \"agent\"\nactions = [\"publish\"]\ntopics = [\"{prefix}/${{client_id}}/#\"]\n"
        )
    };
    fs::write(d.join("policy.toml"), policy("site")).unwrap();
    fs::write(d.join("rules.toml"), "").unwrap();
    let port = common::free_port();
    let config = format!(
        "data_dir = \"data\"\n{}[rules]\nfile = \"rules.toml\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n\
         [broker.security]\nenforce = true\npolicy = \"policy.toml\"\n",
        common::admin_table()
    );
    let server = common::ServeProc::start(d, &config, move || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let token = common::fleetbus_with_data(&d.join("data"), &["agents", "enroll", "dev1"]);
    let token = token.trim();
    let hangup = || common::sighup(server.pid().unwrap());
    let (client, mut events) = connect(port, "dev1", token).await;
    client
        .publish("site/dev1/reading", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    assert!(
        !disconnected(&mut events, Duration::from_millis(500)).await,
        "allowed by the first policy"
    );

    // the same rule now grants another prefix: dev1's grants change, its connection goes
    fs::write(d.join("policy.toml"), policy("plant")).unwrap();
    hangup();
    assert!(
        disconnected(&mut events, Duration::from_secs(10)).await,
        "dropped by the reload\n{}",
        server.log()
    );
    assert!(
        poll_until(Duration::from_secs(5), || server
            .log()
            .contains("topic policy reloaded")),
        "{}",
        server.log()
    );
    // back under the new policy: the old prefix is a violation, the new one is not
    let (client, mut events) = connect(port, "dev1", token).await;
    client
        .publish("plant/dev1/reading", QoS::AtLeastOnce, false, "2")
        .await
        .unwrap();
    assert!(
        !disconnected(&mut events, Duration::from_millis(500)).await,
        "allowed by the new policy"
    );
    client
        .publish("site/dev1/reading", QoS::AtLeastOnce, false, "3")
        .await
        .unwrap();
    assert!(
        disconnected(&mut events, Duration::from_secs(5)).await,
        "the old prefix is refused now"
    );

    // a broken policy file changes nothing
    fs::write(d.join("policy.toml"), "[[rule]]\nname = \"bad\"\n").unwrap();
    let (client, mut events) = connect(port, "dev1", token).await;
    hangup();
    assert!(
        poll_until(Duration::from_secs(5), || server
            .log()
            .contains("topic policy not reloaded")),
        "{}",
        server.log()
    );
    client
        .publish("plant/dev1/reading", QoS::AtLeastOnce, false, "4")
        .await
        .unwrap();
    assert!(
        !disconnected(&mut events, Duration::from_millis(500)).await,
        "still the policy in effect"
    );
}
