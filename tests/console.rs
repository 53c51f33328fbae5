//! End to end: the event console of a real `fleetbus serve`. Events from in-process
//! agents fold into rows through the log and the `console` sink; an operator lists,
//! acknowledges, closes and silences them with `fleetbus events`, and each change is a
//! message the rules route.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::Fixture;
use fleetbus_agent::checks::builtin::TcpCheck;
use fleetbus_agent::checks::CheckConfig;
use fleetbus_agent::{Agent, AgentConfig};
use fleetbus_protocol::{Event, Resource, Severity};
use serde_json::Value;
use tokio::sync::watch;

const RULES: &str = r#"
[sinks.console]
type = "console"

[sinks.changes]
type = "file"
path = "changes.jsonl"

[[rules]]
name = "console"
from = ["fleet/+/telemetry/events", "fleet/+/telemetry/checks"]
where = "has(record.event) || has(record.check)"
to = ["console"]

[[rules]]
name = "console-changes"
from = ["fleet/server/console/#"]
to = ["changes"]
"#;

/// `fleetbus events ARGS --admin URL --admin-token-file FILE`: its stdout, or its stderr
/// as the error.
fn events(dir: &Path, admin: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(common::bin())
        .arg("events")
        .args(args)
        .args(["--admin", admin, "--admin-token-file"])
        .arg(dir.join("operator.token"))
        .env_remove("FLEETBUS_ADMIN_TOKEN")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn rows(dir: &Path, admin: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["list", "--json"];
    all.extend_from_slice(args);
    events(dir, admin, &all)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_three_agents_fold_and_an_operator_acks_closes_and_silences() {
    let fx = Fixture::new();
    let dir = fx.path();
    common::enroll_operator(&fx.data, &dir.join("operator.token"));
    let mut server = fx.serve(Some(RULES), "serve");
    let admin = format!("http://{}", common::admin_addr(dir));
    fx.wait_listening();

    let t0 = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
    let mut running = Vec::new();
    for agent in ["node-1", "node-2", "node-3"] {
        let mut config = AgentConfig {
            server: format!("mqtt://127.0.0.1:{}", fx.port).parse().unwrap(),
            state_dir: dir.join(format!("state-{agent}")),
            id: Some(agent.into()),
            groups: vec![format!("{agent}-rack"), "web".into()],
            ..AgentConfig::default()
        };
        config.metrics.enabled = false;
        config.heartbeat.enabled = false;
        if agent == "node-1" {
            let mut port = CheckConfig::new(&[], Duration::from_secs(1));
            port.tcp = Some(TcpCheck {
                address: format!("127.0.0.1:{}", fx.port),
            });
            config.checks.insert("broker-port".into(), port);
        }
        let a = Agent::open(fleetbus_agent::Valid::new(config).unwrap()).unwrap();
        for n in 0..50 {
            a.outbox()
                .push("events", |r| {
                    r.ts = t0 + chrono::Duration::seconds(n);
                    r.event = Some(Event {
                        class: "disk.full".into(),
                        severity: Severity::MAJOR,
                        rule: Some("check_disk".into()),
                        group: None,
                        resources: vec![Resource {
                            kind: "mount".into(),
                            name: "/var".into(),
                        }],
                        text: format!("/var 9{n}% used"),
                        clear: false,
                    });
                })
                .unwrap();
        }
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move { a.run(rx).await.unwrap() });
        running.push((stop, task));
    }

    let folded = common::poll_until(Duration::from_secs(30), || {
        events(dir, &admin, &["list", "--json"]).is_ok_and(|out| {
            let counts: Vec<u64> = out
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|r| r["count"].as_u64())
                .collect();
            counts == [50, 50, 50]
        })
    });
    let listed = rows(dir, &admin, &[]);
    assert!(folded, "{listed:#?}");
    for row in &listed {
        assert_eq!(row["first"], "2027-01-15T08:00:00Z");
        assert_eq!(row["last"], "2027-01-15T08:00:49Z");
        assert_eq!(row["state"], "open");
        assert_eq!(row["text"], "/var 949% used");
    }
    let id = |agent: &str| {
        listed.iter().find(|r| r["agent"] == agent).unwrap()["id"]
            .as_i64()
            .unwrap()
            .to_string()
    };
    let table = events(dir, &admin, &["list", "--open", "--min-severity", "4"]).unwrap();
    assert!(
        table.contains("3 row(s)") && table.contains("disk.full check_disk"),
        "{table}"
    );
    assert_eq!(rows(dir, &admin, &["--min-severity", "5"]).len(), 0);
    assert_eq!(rows(dir, &admin, &["--agent", "node-2"]).len(), 1);
    assert_eq!(rows(dir, &admin, &["--group", "node-3-rack"]).len(), 1);

    // acknowledge, close, silence
    events(
        dir,
        &admin,
        &["ack", &id("node-1"), "--comment", "cleaning /var"],
    )
    .unwrap();
    events(
        dir,
        &admin,
        &["close", &id("node-2"), "--comment", "disk replaced"],
    )
    .unwrap();
    let again = events(dir, &admin, &["close", &id("node-2")]).unwrap_err();
    assert!(again.contains("is closed already"), "{again}");
    events(
        dir,
        &admin,
        &[
            "silence",
            "--group",
            "node-3-rack",
            "--for",
            "2h",
            "--comment",
            "rack move",
        ],
    )
    .unwrap();
    let after = rows(dir, &admin, &[]);
    let states: Vec<(&str, &str)> = after
        .iter()
        .map(|r| (r["agent"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states.len(), 2, "{after:#?}");
    assert!(states.contains(&("node-1", "acknowledged")) && states.contains(&("node-2", "closed")));
    assert_eq!(rows(dir, &admin, &["--open"]).len(), 1);
    assert_eq!(rows(dir, &admin, &["--silenced"]).len(), 3);
    let silences = events(dir, &admin, &["silences"]).unwrap();
    assert!(
        silences.contains("node-3-rack") && silences.contains("rack move (ops)"),
        "{silences}"
    );

    // each change went through the rules, as a message
    let changes = dir.join("data/changes.jsonl");
    common::wait_until(
        Duration::from_secs(10),
        "three console changes routed",
        || fs::read_to_string(&changes).is_ok_and(|t| t.lines().count() == 3),
    );
    let routed: Vec<Value> = fs::read_to_string(&changes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = routed
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["ack", "close", "silence"]);
    assert_eq!(routed[0]["by"], "ops");
    assert_eq!(routed[0]["comment"], "cleaning /var");
    assert_eq!(routed[0]["event"]["state"], "acknowledged");

    // the agent's checks, with their latest result, in `agents show`
    common::wait_until(
        Duration::from_secs(10),
        "node-1's check in agents show",
        || {
            let out = std::process::Command::new(common::bin())
                .args([
                    "agents",
                    "show",
                    "node-1",
                    "--admin",
                    &admin,
                    "--admin-token-file",
                ])
                .arg(dir.join("operator.token"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            text.contains("checks (1):") && text.contains("broker-port          OK (hard)")
        },
    );

    // no operator token: refused
    let out = std::process::Command::new(common::bin())
        .args(["events", "list", "--admin", &admin])
        .env_remove("FLEETBUS_ADMIN_TOKEN")
        .env_remove("FLEETBUS_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());

    for (stop, task) in running {
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    server.terminate(Duration::from_secs(10));
}
