//! End-to-end: conditions and fan-out, with a third-party client publishing JSON.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const RULES: &str = r#"
[sinks.all]
type = "file"
path = "all/{agent}.jsonl"

[sinks.copy]
type = "file"
path = "copy/{topic.1}-{stream}.jsonl"

[sinks.hot]
type = "file"
path = "hot/%Y.jsonl"

[[rules]]
name = "everything"
from = ["fleet/+/telemetry/#"]
to = ["all", "copy"]

[[rules]]
name = "too-hot"
from = ["fleet/+/telemetry/sensors"]
where = 'has(record.temp) && record.temp > 50.0 && agent == "thermo"'
to = ["hot"]
"#;

/// A rule with a condition routes only the matching records; a rule with two sinks writes
/// every record to both; JSON from a third-party publisher is accepted.
#[test]
fn conditions_select_and_fan_out_writes_every_sink() {
    let fx = Fixture::new();
    let data = &fx.data;
    let mut server = fx.serve(Some(RULES), "server");
    fx.wait_listening();

    let mut opts = MqttOptions::new("third-party", "127.0.0.1", fx.port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 100);
    let temps: Vec<f64> = (0..40).map(|i| (i * 7 % 100) as f64).collect();
    for (i, t) in temps.iter().enumerate() {
        let body = format!(
            r#"{{"seq":{},"ts":"2026-05-01T00:00:00Z","temp":{t}}}"#,
            i + 1
        );
        client
            .publish(
                "fleet/thermo/telemetry/sensors",
                QoS::AtLeastOnce,
                false,
                body,
            )
            .unwrap();
    }
    let mut acked = 0;
    for event in conn.iter() {
        if let Ok(Event::Incoming(Packet::PubAck(_))) = event {
            acked += 1;
            if acked == temps.len() {
                break;
            }
        }
    }
    wait_until(Duration::from_secs(10), "all records in both sinks", || {
        summary(&data.join("all"), "thermo", "sensors").is_some_and(|s| s.records == 40)
            && summary(&data.join("copy"), "thermo", "sensors").is_some_and(|s| s.records == 40)
    });
    assert!(server.terminate(Duration::from_secs(15)).success());

    for sink in ["all", "copy"] {
        let s = summary(&data.join(sink), "thermo", "sensors").unwrap();
        assert!(
            s.is_contiguous() && s.first_seq == 1 && s.last_seq == 40,
            "{sink}: {s:?}"
        );
    }
    assert!(data.join("copy/thermo-sensors.jsonl").exists());
    let hot = records(&data.join("hot"));
    let hot_seqs: Vec<u64> = hot.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = temps
        .iter()
        .enumerate()
        .filter(|(_, t)| **t > 50.0)
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        hot_seqs, expected,
        "only records above 50 degrees, each once, in order"
    );
    assert!(
        data.join("hot/2026.jsonl").exists(),
        "strftime from the record's ts"
    );
    // the topic is authoritative for identity
    assert!(hot
        .iter()
        .all(|r| r["agent"] == "thermo" && r["stream"] == "sensors"));
}

/// `fleetbus rules run` as its own process against a broker (here the embedded one of a
/// `serve` with the built-in rules) writes what the agents publish, like the built-in
/// engine; a forged file completion from the network reaches none of its sinks (it used to
/// stall the sink that tried to copy a file that does not exist). SIGHUP reloads its rules
/// file, and it subscribes to a new rule's filter.
#[test]
fn standalone_rules_engine_against_a_broker() {
    let fx = Fixture::new();
    let _server = fx.serve(None, "server");
    fx.wait_listening();
    let rules = fx.path().join("standalone.toml");
    let first = "[sinks.out]\ntype = \"file\"\npath = \"{agent}-{stream}.jsonl\"\n\
         [sinks.files]\ntype = \"file\"\npath = \"files/{agent}/{file.name}\"\n\
         [[rules]]\nname = \"hb\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [\"out\"]\n\
         [[rules]]\nname = \"files\"\nfrom = [\"fleet/+/files/+/complete\"]\nto = [\"files\"]\n";
    std::fs::write(&rules, first).unwrap();
    let standalone_data = fx.path().join("standalone-data");
    let mut engine = Proc::start(
        &[
            "rules",
            "run",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", fx.port),
            "--rules",
            rules.to_str().unwrap(),
            "--data-dir",
            standalone_data.to_str().unwrap(),
        ],
        &fx.path().join("engine.log"),
    );
    wait_until(
        Duration::from_secs(10),
        "standalone engine subscribed",
        || engine.log_text().contains("rules engine connected"),
    );
    // a forged completion, published before the agent's records
    let (client, mut connection) = rumqttc::Client::new(
        rumqttc::MqttOptions::new("forger", "127.0.0.1", fx.port),
        10,
    );
    client
        .publish(
            "fleet/st/files/f1/complete",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"file":{"id":"f1","name":"x","size":3},"spool":"st/f1/data"}"#,
        )
        .unwrap();
    for event in connection.iter().take(20) {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
            break;
        }
    }
    let mut agent = fx.agent("st", Some("st"), 50);
    wait_until(
        Duration::from_secs(20),
        "heartbeats through the standalone engine",
        || summary(&standalone_data, "st", "heartbeat").is_some_and(|s| s.records >= 20),
    );
    assert!(!standalone_data.join("files").exists());
    assert!(
        engine.log_text().contains("only the server produces"),
        "{}",
        engine.log_text()
    );
    // only the rule's filter: no metrics
    assert!(summary(&standalone_data, "st", "metrics").is_none());
    // SIGHUP with a rule for metrics: the engine subscribes to its filter too
    std::fs::write(
        &rules,
        format!("{first}[[rules]]\nname = \"metrics\"\nfrom = [\"fleet/+/telemetry/metrics\"]\nto = [\"out\"]\n"),
    )
    .unwrap();
    sighup(engine.child.id());
    wait_until(
        Duration::from_secs(20),
        "metrics through the reloaded rules",
        || summary(&standalone_data, "st", "metrics").is_some(),
    );
    assert!(
        engine
            .log_text()
            .contains("rules reloaded: subscriptions follow their filters"),
        "{}",
        engine.log_text()
    );
    assert!(agent.terminate(Duration::from_secs(10)).success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(engine.terminate(Duration::from_secs(10)).success());
    let s = summary(&standalone_data, "st", "heartbeat").unwrap();
    assert!(s.is_contiguous() && s.first_seq == 1, "{s:?}");
}

/// The birth message reaches the rules engine on connect, and the broker publishes the
/// agent's last will when the agent dies without saying goodbye.
#[test]
fn presence_birth_and_last_will_are_routable() {
    let fx = Fixture::new();
    let rules = "[sinks.p]\ntype = \"file\"\npath = \"presence/{topic.1}.jsonl\"\n\
                 [[rules]]\nname = \"presence\"\nfrom = [\"fleet/+/presence\"]\nto = [\"p\"]\n";
    let _server = fx.serve(Some(rules), "server");
    let mut agent = fx.agent("pr", Some("pr"), 1000);
    let file = fx.data.join("presence/pr.jsonl");
    let statuses = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(10), "birth message", || {
        !statuses().is_empty()
    });
    let birth = &statuses()[0];
    assert_eq!(birth["status"], "online");
    assert_eq!(birth["agent"], "pr");
    assert_eq!(birth["groups"][0], "pr-group");
    assert!(birth["agent_version"].is_string() && birth["hostname"].is_string());
    agent.kill();
    wait_until(Duration::from_secs(10), "last will after SIGKILL", || {
        statuses().iter().any(|s| s["status"] == "offline")
    });
}

const RELOAD_V1: &str = r#"
[sinks.archive]
type = "file"
path = "archive/{agent}.jsonl"

[[rules]]
name = "heartbeats"
from = ["fleet/+/telemetry/heartbeat"]
to = ["archive"]
"#;

/// A `[metrics]` table on a free port, and the port.
fn metrics_table() -> (String, u16) {
    let port = free_port();
    (format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"), port)
}

/// The value of the unlabelled metric `name` on the metrics endpoint at `port`.
fn metric(port: u16, name: &str) -> u64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn hangup(server: &Proc) {
    sighup(server.child.id());
}

/// Five agents stream heartbeats while SIGHUP reloads the rules three times: a sink added,
/// a broken file (refused: the rules in effect stay, the failure is counted in `/metrics`
/// and explained by `GET /rules`), the sink removed. Every heartbeat is archived exactly
/// once and in order throughout, and the added sink holds an unbroken run of them.
#[test]
fn sighup_reloads_the_rules_under_load_and_a_broken_file_changes_nothing() {
    let fx = Fixture::new();
    let (table, metrics_port) = metrics_table();
    let token = fleetbus_with_data(&fx.data, &["agents", "enroll", "ops", "--role", "operator"]);
    let server = fx.serve_with(Some(RELOAD_V1), "server", &table);
    fx.wait_listening();
    let agents: Vec<Proc> = (0..5)
        .map(|n| {
            let id = format!("r{n}");
            fx.agent_with(&id, &heartbeat_agent(&id, 10, 300))
        })
        .collect();
    let archived = |agent: &str| {
        summary(&fx.data.join("archive"), agent, "heartbeat")
            .map(|s| s.records)
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(20), "heartbeats archived", || {
        (0..5).all(|n| archived(&format!("r{n}")) > 20)
    });

    // v2: a second sink for the same heartbeats
    let v2 = format!(
        "{RELOAD_V1}\n[sinks.second]\ntype = \"file\"\npath = \"second/{{agent}}.jsonl\"\n\
         [[rules]]\nname = \"copy\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [\"second\"]\n"
    );
    std::fs::write(fx.path().join("rules.toml"), &v2).unwrap();
    hangup(&server);
    wait_until(Duration::from_secs(10), "generation 2", || {
        metric(metrics_port, "fleetbus_rules_generation") == 2
    });
    let copied = || {
        summary(&fx.data.join("second"), "r0", "heartbeat")
            .map(|s| s.records)
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(10), "the new sink writing", || {
        copied() > 5
    });

    // v3: broken; nothing changes, and the admin endpoint says why
    std::fs::write(
        fx.path().join("rules.toml"),
        format!("{v2}\n[[rules]]\nname = \"x\"\nfrom = [\"fleet/#/bad\"]\nto = [\"second\"]\n"),
    )
    .unwrap();
    hangup(&server);
    wait_until(Duration::from_secs(10), "the refusal counted", || {
        metric(metrics_port, "fleetbus_rules_reload_failures_total") == 1
    });
    assert_eq!(metric(metrics_port, "fleetbus_rules_generation"), 2);
    let admin = admin_addr(fx.path());
    let status: serde_json::Value = ureq::get(&format!("http://{admin}/rules"))
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(status["reload_failures"], 1, "{status}");
    let error = status["last_error"]["error"].as_str().unwrap();
    assert!(
        error.contains("rules.toml:") && error.contains("bad topic filter"),
        "{error}"
    );
    let before = copied();
    wait_until(
        Duration::from_secs(10),
        "the second sink still writing",
        || copied() > before,
    );

    // v4: the second sink removed
    std::fs::write(fx.path().join("rules.toml"), RELOAD_V1).unwrap();
    hangup(&server);
    wait_until(Duration::from_secs(10), "generation 3", || {
        metric(metrics_port, "fleetbus_rules_generation") == 3
    });

    wait_until(Duration::from_secs(30), "every heartbeat archived", || {
        (0..5).all(|n| archived(&format!("r{n}")) >= 300)
    });
    drop(agents);
    for n in 0..5 {
        let agent = format!("r{n}");
        let s = summary(&fx.data.join("archive"), &agent, "heartbeat").unwrap();
        assert!(
            s.is_contiguous() && s.first_seq == 1 && s.last_seq == 300,
            "{agent}: {s:?}"
        );
        let second = summary(&fx.data.join("second"), &agent, "heartbeat").unwrap();
        assert!(
            second.is_contiguous() && second.records > 5,
            "{agent} in the removed sink: {second:?}"
        );
        assert!(
            second.last_seq < 300,
            "{agent}: the removed sink got nothing after the reload: {second:?}"
        );
    }
    let log = server.log_text();
    assert!(
        log.contains("rules not reloaded") || log.contains("rules file not reloaded"),
        "{log}"
    );
}

/// With `[rules] watch = true` a change to the file takes effect without a signal.
#[test]
fn rules_watch_reloads_a_changed_file() {
    let fx = Fixture::new();
    let (table, metrics_port) = metrics_table();
    // server_config ends with the [rules] table: `watch` joins it
    let server = fx.serve_with(Some(RELOAD_V1), "server", &format!("watch = true\n{table}"));
    fx.wait_listening();
    let _agent = fx.agent_with("w", &heartbeat_agent("w", 20, 0));
    std::fs::write(
        fx.path().join("rules.toml"),
        format!("{RELOAD_V1}\n[sinks.second]\ntype = \"file\"\npath = \"second/{{agent}}.jsonl\"\n[[rules]]\nname = \"copy\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [\"second\"]\n"),
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "generation 2", || {
        metric(metrics_port, "fleetbus_rules_generation") == 2
    });
    wait_until(Duration::from_secs(10), "the new sink writing", || {
        summary(&fx.data.join("second"), "w", "heartbeat").is_some()
    });
    drop(server);
}

/// `fleetbus rules tap` shows what the running engine does with a message (the rules that
/// matched, what each made, the sinks) within a second of its publish.
#[test]
fn rules_tap_shows_a_message_within_a_second_of_its_publish() {
    let fx = Fixture::new();
    let rules = r#"
[sinks.all]
type = "file"
path = "all/{agent}.jsonl"

[sinks.points]
type = "file"
path = "points/{agent}.jsonl"

[[rules]]
name = "everything"
from = ["fleet/+/telemetry/#"]
to = ["all"]

[[rules]]
name = "points"
from = ["fleet/+/telemetry/sensors"]
foreach = "record.readings"
where = "item > 1.0"
set = { sent_ms = "record.sent_ms" }
to = ["points"]
"#;
    common::enroll_operator(&fx.data, &fx.path().join("ops.token"));
    let _server = fx.serve(Some(rules), "server");
    fx.wait_listening();
    let admin = admin_addr(fx.path());
    // a bad filter and an unknown rule are refused, saying what
    for (filter, rule, says) in [
        ("fleet/#/x", "points", "filter `fleet/#/x`"),
        ("fleet/+/telemetry/#", "nope", "no rule named `nope`"),
    ] {
        let out = std::process::Command::new(bin())
            .args([
                "rules",
                "tap",
                filter,
                "--rule",
                rule,
                "--admin",
                &format!("http://{admin}"),
                "--admin-token-file",
                fx.path().join("ops.token").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("400") && err.contains(says),
            "{err}"
        );
    }
    let mut tap = std::process::Command::new(bin())
        .args([
            "rules",
            "tap",
            "fleet/+/telemetry/sensors",
            "--json",
            "--count",
            "1",
            "--admin",
            &format!("http://{admin}"),
            "--admin-token-file",
            fx.path().join("ops.token").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tap.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send((line, std::time::SystemTime::now()));
        }
    });

    // publish until the view is open and shows one (it may open after the first ones)
    let mut opts = MqttOptions::new("sensor", "127.0.0.1", fx.port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let started = std::time::Instant::now();
    let (line, read_at) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the tap showed nothing"
        );
        let body = format!(r#"{{"sent_ms":{},"readings":[0.5,2.5,3.5]}}"#, now_ms());
        client
            .publish("fleet/s1/telemetry/sensors", QoS::AtLeastOnce, false, body)
            .unwrap();
        if let Ok(got) = lines_rx.recv_timeout(Duration::from_millis(200)) {
            break got;
        }
    };
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    let sent_ms = event["message"]["sent_ms"].as_u64().unwrap();
    let read_ms = read_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        read_ms - sent_ms < 1_000,
        "shown {} ms after its publish",
        read_ms - sent_ms
    );
    assert_eq!(event["topic"], "fleet/s1/telemetry/sensors");
    assert_eq!(event["outcome"], "appended");
    let rules = event["rules"].as_array().unwrap();
    let outcome = |rule: &str, part: u64| {
        rules
            .iter()
            .find(|r| r["rule"] == rule && r["part"] == part)
            .unwrap_or_else(|| panic!("no {rule}[{part}] in {event}"))
            .clone()
    };
    assert_eq!(outcome("everything", 0)["outcome"], "sent");
    assert_eq!(
        outcome("everything", 0)["sinks"],
        serde_json::json!(["all"])
    );
    assert_eq!(outcome("points", 0)["outcome"], "filtered");
    let made = outcome("points", 1);
    assert_eq!(made["outcome"], "sent");
    assert_eq!(made["sinks"], serde_json::json!(["points"]));
    assert_eq!(made["made"]["value"], 2.5);
    assert_eq!(made["made"]["sent_ms"], sent_ms);
    assert!(tap.wait().unwrap().success(), "--count 1 ends the view");
}
