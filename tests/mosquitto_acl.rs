//! The policy exported by `fleetbus acl export --format mosquitto`, loaded into a real
//! Mosquitto (Debian package), decides a table of publish/subscribe cases exactly as the
//! embedded broker's policy does. Skipped when Mosquitto is not installed, unless
//! FLEETBUS_TEST_REQUIRE=1 (CI installs it).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetbus_broker::acl::{Action, Identity, Policy, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};

fn fleetbus(dir: &Path, args: &[&str]) -> String {
    common::fleetbus_with_data(&dir.join("data"), args)
}

async fn connect(port: u16, id: &str, token: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(id, token);
    let (client, mut events) = AsyncClient::new(o, 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return (client, events),
            Ok(Ok(_)) => {}
            other => panic!("{id} did not connect to mosquitto: {other:?}"),
        }
    }
}

/// Whether a message `sender` publishes on `topic` reaches `receiver` subscribed to
/// `filter`: what a policy is for. (Mosquitto grants every SUBSCRIBE and filters the
/// messages it delivers by `read` grants; the embedded broker refuses the SUBSCRIBE and
/// disconnects. Either way nothing forbidden arrives.)
async fn delivered(
    port: u16,
    (receiver, receiver_token): (&str, &str),
    filter: &str,
    (sender, sender_token): (&str, &str),
    topic: &str,
) -> bool {
    let (watch, mut watch_events) = connect(port, receiver, receiver_token).await;
    watch.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), watch_events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                if !matches!(ack.return_codes[0], SubscribeReasonCode::Success(_)) {
                    return false;
                }
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK for {receiver} {filter}: {other:?}"),
        }
    }
    let (client, mut events) = connect(port, sender, sender_token).await;
    let marker = format!("{sender} {topic}");
    client
        .publish(topic, QoS::AtLeastOnce, false, marker.clone().into_bytes())
        .await
        .unwrap();
    let publisher = tokio::spawn(async move {
        for _ in 0..20 {
            if events.poll().await.is_err() {
                break;
            }
        }
    });
    let delivered = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            match watch_events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.payload == marker.as_bytes() => return,
                Ok(_) => {}
                Err(e) => panic!("{receiver} lost mosquitto: {e}"),
            }
        }
    })
    .await
    .is_ok();
    publisher.abort();
    delivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_acl_decides_like_the_embedded_policy() {
    let Some(passwd) = common::mosquitto::find("mosquitto_passwd") else {
        common::skip_or_fail("mosquitto");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let clients = [
        ("web-01", Role::Agent, "web"),
        ("db-01", Role::Agent, "db"),
        ("ops", Role::Operator, ""),
        ("rules", Role::Server, ""),
        ("watcher", Role::Server, ""),
    ];
    let mut tokens = std::collections::HashMap::new();
    let mut identities = std::collections::HashMap::new();
    let passwords = d.join("passwords");
    for (i, (id, role, group)) in clients.iter().enumerate() {
        let role_name = role.as_str();
        let mut args = vec!["agents", "enroll", id, "--role", role_name];
        if !group.is_empty() {
            args.extend(["--groups", group]);
        }
        let token = fleetbus(d, &args).trim().to_string();
        let mut cmd = Command::new(&passwd);
        if i == 0 {
            cmd.arg("-c");
        }
        common::run_ok(cmd.args(["-b", passwords.to_str().unwrap(), id, &token]));
        tokens.insert(*id, token);
        identities.insert(
            *id,
            Identity {
                client_id: id.to_string(),
                role: *role,
                groups: if group.is_empty() {
                    vec![]
                } else {
                    vec![group.to_string()]
                },
            },
        );
    }
    // a revoked client is left out of the export
    fleetbus(d, &["agents", "enroll", "gone"]);
    fleetbus(d, &["agents", "revoke", "gone"]);
    let acl = fleetbus(d, &["acl", "export", "--format", "mosquitto"]);
    assert!(!acl.contains("user gone"), "{acl}");
    fs::write(d.join("acl"), &acl).unwrap();
    let Some(broker) = common::mosquitto::Mosquitto::start(
        d,
        &format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}",
            passwords.display(),
            d.join("acl").display()
        ),
    ) else {
        return;
    };
    let port = broker.port;

    // (client, action, topic or filter, for a SUBSCRIBE: the topic published to probe it)
    let cases: &[(&str, Action, &str, &str)] = &[
        (
            "web-01",
            Action::Publish,
            "fleet/web-01/telemetry/metrics",
            "",
        ),
        ("web-01", Action::Publish, "fleet/web-01/presence", ""),
        ("web-01", Action::Publish, "fleet/web-01/jobs/status", ""),
        (
            "web-01",
            Action::Publish,
            "fleet/web-02/telemetry/metrics",
            "",
        ),
        ("web-01", Action::Publish, "fleet/web-01/acks", ""),
        (
            "web-01",
            Action::Publish,
            "fleet/groups/web/jobs/notify",
            "",
        ),
        (
            "web-01",
            Action::Subscribe,
            "fleet/web-01/acks",
            "fleet/web-01/acks",
        ),
        (
            "web-01",
            Action::Subscribe,
            "fleet/web-01/replies/files",
            "fleet/web-01/replies/files",
        ),
        (
            "web-01",
            Action::Subscribe,
            "fleet/groups/web/jobs/notify",
            "fleet/groups/web/jobs/notify",
        ),
        (
            "web-01",
            Action::Subscribe,
            "fleet/groups/db/jobs/notify",
            "fleet/groups/db/jobs/notify",
        ),
        (
            "web-01",
            Action::Subscribe,
            "fleet/#",
            "fleet/db-01/telemetry/metrics",
        ),
        (
            "web-01",
            Action::Subscribe,
            "fleet/+/acks",
            "fleet/db-01/acks",
        ),
        (
            "db-01",
            Action::Subscribe,
            "fleet/groups/db/jobs/notify",
            "fleet/groups/db/jobs/notify",
        ),
        (
            "db-01",
            Action::Subscribe,
            "fleet/web-01/acks",
            "fleet/web-01/acks",
        ),
        (
            "ops",
            Action::Subscribe,
            "fleet/+/telemetry/#",
            "fleet/web-01/telemetry/metrics",
        ),
        ("ops", Action::Subscribe, "fleet/#", "fleet/web-01/acks"),
        ("ops", Action::Publish, "fleet/web-01/acks", ""),
        ("rules", Action::Publish, "fleet/web-01/acks", ""),
        (
            "rules",
            Action::Subscribe,
            "fleet/+/telemetry/#",
            "fleet/db-01/telemetry/x",
        ),
    ];
    let policy = Policy::default();
    let mut table = String::new();
    let mut mismatches = Vec::new();
    let (mut allowed, mut denied) = (0, 0);
    let watcher = ("watcher", tokens["watcher"].as_str());
    for (id, action, topic, probe) in cases {
        let embedded = policy.check(&identities[id], *action, topic).allowed;
        let client = (*id, tokens[id].as_str());
        let external = match action {
            Action::Publish => delivered(port, watcher, "#", client, topic).await,
            Action::Subscribe => delivered(port, client, topic, watcher, probe).await,
        };
        table.push_str(&format!(
            "{id:<7} {action:<9?} {topic:<30} {probe:<30} embedded {embedded:<5} mosquitto {external}\n"
        ));
        if embedded != external {
            mismatches.push(format!("{id} {action:?} {topic}"));
        }
        if embedded {
            allowed += 1;
        } else {
            denied += 1;
        }
    }
    eprintln!("{table}");
    assert!(
        mismatches.is_empty(),
        "mosquitto decided differently: {mismatches:?}\n{table}\n{acl}\n{}",
        broker.log_text()
    );
    assert!(allowed >= 5 && denied >= 5, "{table}");
}
