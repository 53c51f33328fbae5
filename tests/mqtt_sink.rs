//! The MQTT sink end to end, with real processes: `fleetbus serve`, an agent, and MQTT
//! subscribers.
//! - Into the server's own broker: a subscriber gets every heartbeat once, in order, on
//!   the templated topic, and a late subscriber the retained last one.
//! - Bridged to a real Mosquitto (Debian package) with a password: a wrong password is
//!   reported at start and nothing is lost meanwhile; after a restart with the right one,
//!   and through a broker that hangs for seconds (SIGSTOP), every heartbeat arrives, at
//!   least once and in order.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};

/// Connects `id` (with `login` when given) to 127.0.0.1:`port` and subscribes `filter`.
async fn subscribe(
    port: u16,
    id: &str,
    login: Option<(&str, &str)>,
    filter: &str,
) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(o, 16);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                assert!(
                    matches!(ack.return_codes[0], SubscribeReasonCode::Success(_)),
                    "{id}: subscription to {filter} refused"
                );
                return (client, events);
            }
            Ok(Ok(_)) => {}
            other => panic!("{id}: no SUBACK for {filter}: {other:?}"),
        }
    }
}

/// One message a subscriber got: topic, the record's seq, the retain flag.
type Got = (String, u64, bool);

/// Messages `events` receives until `done` says so or `timeout` passes.
async fn collect(
    events: &mut EventLoop,
    timeout: Duration,
    mut done: impl FnMut(&[Got]) -> bool,
) -> Vec<Got> {
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let body: serde_json::Value = serde_json::from_slice(&p.payload)
                    .unwrap_or_else(|e| panic!("payload on {} is not JSON: {e}", p.topic));
                let seq = body["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no seq: {body}"));
                got.push((p.topic.clone(), seq, p.retain));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber lost its broker: {e}"),
            Err(_) => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_the_servers_own_broker_every_record_arrives_once_in_order_and_the_last_is_retained() {
    let fx = Fixture::new();
    let rules = r#"
[sinks.alerts]
type = "mqtt"
topic = "alerts/{agent}/{stream}"
retain = true

[[rules]]
name = "heartbeats"
from = ["fleet/+/telemetry/heartbeat"]
to = ["alerts"]
"#;
    let _server = fx.serve(Some(rules), "server");
    fx.wait_listening();
    let (_watch, mut events) = subscribe(fx.port, "watcher", None, "alerts/#").await;
    let _agent = fx.agent_with("web", &heartbeat_agent("web-1", 20, 100));
    let got = collect(&mut events, Duration::from_secs(60), |g| g.len() >= 100).await;
    assert_eq!(got.len(), 100, "{got:?}");
    let first = got[0].1;
    for (n, (topic, seq, _)) in got.iter().enumerate() {
        assert_eq!(topic, "alerts/web-1/heartbeat");
        assert_eq!(*seq, first + n as u64, "out of order or twice: {got:?}");
    }
    // nothing more: each record went out once
    let more = collect(&mut events, Duration::from_secs(2), |g| !g.is_empty()).await;
    assert!(more.is_empty(), "{more:?}");

    // a subscriber that comes later gets the last one, retained
    let (_late, mut late_events) = subscribe(fx.port, "late", None, "alerts/#").await;
    let retained = collect(&mut late_events, Duration::from_secs(10), |g| !g.is_empty()).await;
    assert_eq!(
        retained,
        vec![("alerts/web-1/heartbeat".to_string(), first + 99, true)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_to_mosquitto_nothing_is_lost_to_a_wrong_password_or_a_hung_broker() {
    let fx = Fixture::new();
    let dir = fx.path();
    let Some(passwd) = mosquitto::find("mosquitto_passwd") else {
        skip_or_fail("mosquitto");
        return;
    };
    let passwords = dir.join("passwords");
    for (n, (user, password)) in [("bridge", "bridge-secret"), ("watcher", "watch-secret")]
        .iter()
        .enumerate()
    {
        let mut cmd = Command::new(&passwd);
        if n == 0 {
            cmd.arg("-c");
        }
        run_ok(cmd.args(["-b", passwords.to_str().unwrap(), user, password]));
    }
    let Some(broker) = mosquitto::Mosquitto::start(
        dir,
        &format!(
            "allow_anonymous false\npassword_file {}",
            passwords.display()
        ),
    ) else {
        return;
    };
    let password_file = dir.join("bridge-password");
    std::fs::write(&password_file, "not-the-password\n").unwrap();
    let rules = format!(
        r#"
[sinks.central]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
topic = "site-a/{{agent}}/{{stream}}"
username = "bridge"
password = {{ file = "{}" }}
timeout = "2s"
batch.retry_backoff_max = "500ms"

[[rules]]
name = "heartbeats"
from = ["fleet/+/telemetry/heartbeat"]
to = ["central"]
"#,
        broker.port,
        password_file.display()
    );
    let (_watch, mut events) = subscribe(
        broker.port,
        "watcher",
        Some(("watcher", "watch-secret")),
        "site-a/#",
    )
    .await;

    // a wrong password: said at start and at every write, and nothing is lost meanwhile
    let mut server = fx.serve(Some(&rules), "server");
    fx.wait_listening();
    const N: u64 = 600;
    let _agent = fx.agent_with("web", &heartbeat_agent("web-1", 10, N));
    wait_until(Duration::from_secs(20), "the refusal in the log", || {
        let log = server.log_text();
        log.contains("mqtt sink: broker not reachable at start") && log.contains("NotAuthorized")
    });
    let none = collect(&mut events, Duration::from_secs(1), |g| !g.is_empty()).await;
    assert!(none.is_empty(), "{none:?}");
    server.terminate(Duration::from_secs(20));

    // the right password: everything arrives, through a broker that hangs meanwhile
    std::fs::write(&password_file, "bridge-secret\n").unwrap();
    let _server = fx.serve(Some(&rules), "server-2");
    let mut got = collect(&mut events, Duration::from_secs(30), |g| !g.is_empty()).await;
    let pid = broker.pid().to_string();
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    tokio::time::sleep(Duration::from_secs(4)).await;
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    let earlier = got.clone();
    let later = collect(&mut events, Duration::from_secs(90), |g| {
        let all: BTreeSet<u64> = earlier.iter().chain(g).map(|m| m.1).collect();
        all.len() as u64 >= N
    })
    .await;
    got.extend(later);
    let seqs: BTreeSet<u64> = got.iter().map(|m| m.1).collect();
    assert_eq!(
        seqs.len() as u64,
        N,
        "missing: {} of {N}",
        N - seqs.len() as u64
    );
    // at least once, and in order of first arrival
    let mut last = None;
    let mut seen = BTreeSet::new();
    for (topic, seq, _) in &got {
        assert_eq!(topic, "site-a/web-1/heartbeat");
        if seen.insert(*seq) {
            assert!(last < Some(*seq), "{seq} arrived after {last:?}");
            last = Some(*seq);
        }
    }
}
