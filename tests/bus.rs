//! End-to-end: `fleetbus serve` and `fleetbus agent` as real processes over real sockets.

mod common;

use std::fs;
use std::time::Duration;

use chrono::Utc;
use common::*;

/// Agents started, left running a while, then asked to stop: every record of every agent
/// arrived in the file sink, per stream from seq 1 with no gap, no duplicate, in order.
#[test]
fn three_agents_records_arrive_complete_and_in_order() {
    let fx = Fixture::new();
    let mut server = fx.serve(None, "server");
    let names = ["a1", "a2", "a3"];
    let mut agents: Vec<Proc> = names.iter().map(|n| fx.agent(n, Some(n), 50)).collect();
    wait_until(
        Duration::from_secs(30),
        "40 heartbeats from every agent",
        || {
            names
                .iter()
                .all(|a| summary(&fx.data, a, "heartbeat").is_some_and(|s| s.records >= 40))
        },
    );
    for agent in &mut agents {
        assert!(agent.terminate(Duration::from_secs(10)).success());
    }
    assert!(server.terminate(Duration::from_secs(15)).success());

    let inv = scan(&fx.data).unwrap();
    for agent in names {
        for stream in ["heartbeat", "metrics"] {
            let s = &inv.streams[&(agent.to_string(), stream.to_string())];
            assert_eq!(s.first_seq, 1, "{agent}/{stream}: {s:?}");
            assert!(s.is_contiguous(), "{agent}/{stream}: {s:?}");
            assert_eq!(s.records, s.last_seq, "{agent}/{stream}: {s:?}");
        }
    }
    assert_eq!(inv.unparsable, 0);
    // the metrics records carry real system metrics
    let recs = records(&fx.data.join("telemetry/a1/metrics"));
    let names: Vec<&str> = recs[0]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for expected in ["cpu.usage", "mem.used", "swap.total", "load.1", "disk.used"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
}

/// An agent killed with SIGKILL and started again keeps its generated id and continues its
/// sequence numbers: nothing is missing and nothing produced after the restart reuses a
/// number from before.
#[test]
fn killed_agent_keeps_its_id_and_continues_its_sequence() {
    let fx = Fixture::new();
    let _server = fx.serve(None, "server");
    let mut agent = fx.agent("k", None, 20);
    let id_file = fx.path().join("state-k/agent-id");
    wait_until(Duration::from_secs(10), "agent id file", || {
        id_file.exists()
    });
    let id = fs::read_to_string(&id_file).unwrap().trim().to_string();
    wait_until(Duration::from_secs(20), "30 heartbeats", || {
        summary(&fx.data, &id, "heartbeat").is_some_and(|s| s.records >= 30)
    });
    agent.kill();
    let killed_at = Utc::now();
    let before = summary(&fx.data, &id, "heartbeat").unwrap();

    let mut agent = fx.agent("k", None, 20);
    wait_until(
        Duration::from_secs(20),
        "heartbeats after the restart",
        || summary(&fx.data, &id, "heartbeat").is_some_and(|s| s.last_seq >= before.last_seq + 30),
    );
    assert!(agent.terminate(Duration::from_secs(10)).success());
    std::thread::sleep(Duration::from_millis(1500)); // the sink flushes every 500 ms

    assert_eq!(
        fs::read_to_string(&id_file).unwrap().trim(),
        id,
        "the agent id changed"
    );
    let inv = scan(&fx.data).unwrap();
    let agents: Vec<&String> = inv.streams.keys().map(|(a, _)| a).collect();
    assert!(
        agents.iter().all(|a| **a == id),
        "records under another id: {agents:?}"
    );
    let s = &inv.streams[&(id.clone(), "heartbeat".to_string())];
    assert_eq!(s.first_seq, 1);
    assert_eq!(s.missing, 0, "{s:?}");
    assert_eq!(s.duplicates, 0, "re-sent records are de-duplicated: {s:?}");
    // records made after the restart never reuse a sequence number from before it
    let heartbeats: Vec<serde_json::Value> = records(&fx.data)
        .into_iter()
        .filter(|r| r["stream"] == "heartbeat")
        .collect();
    let max_before_kill = heartbeats
        .iter()
        .filter(|r| ts(r) < killed_at)
        .map(|r| r["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    let restarted = killed_at + chrono::Duration::milliseconds(100);
    for r in heartbeats.iter().filter(|r| ts(r) > restarted) {
        assert!(
            r["seq"].as_u64().unwrap() > max_before_kill,
            "seq reused after restart: {r}"
        );
    }
}

/// The server stopped for 10 s while agents keep producing: the records made meanwhile
/// wait in the agents' outboxes and arrive after the restart, none missing, in order.
#[test]
fn records_made_while_the_server_is_down_arrive_after_it_returns() {
    let fx = Fixture::new();
    let mut server = fx.serve(None, "server");
    let names = ["s1", "s2"];
    let mut agents: Vec<Proc> = names.iter().map(|n| fx.agent(n, Some(n), 50)).collect();
    wait_until(Duration::from_secs(20), "first heartbeats", || {
        names
            .iter()
            .all(|a| summary(&fx.data, a, "heartbeat").is_some_and(|s| s.records >= 10))
    });
    assert!(server.terminate(Duration::from_secs(15)).success());
    let down_from = Utc::now();
    std::thread::sleep(Duration::from_secs(10));
    let down_until = Utc::now();
    let mut server = fx.serve(None, "server-restarted");
    wait_until(
        Duration::from_secs(30),
        "records made during the outage",
        || {
            let recs = records(&fx.data);
            names
                .iter()
                .all(|a| recs.iter().any(|r| r["agent"] == *a && ts(r) > down_until))
        },
    );
    for agent in &mut agents {
        assert!(agent.terminate(Duration::from_secs(10)).success());
    }
    assert!(server.terminate(Duration::from_secs(15)).success());

    let recs = records(&fx.data);
    for agent in names {
        let during = recs
            .iter()
            .filter(|r| r["agent"] == agent && r["stream"] == "heartbeat")
            .filter(|r| ts(r) > down_from + chrono::Duration::seconds(1) && ts(r) < down_until)
            .count();
        assert!(
            during >= 100,
            "{agent}: only {during} records from the outage arrived"
        );
        let s = summary(&fx.data, agent, "heartbeat").unwrap();
        assert_eq!(s.first_seq, 1);
        assert_eq!(s.missing, 0, "{agent}: {s:?}");
        assert_eq!(s.out_of_order, 0, "{agent}: {s:?}");
        // the server de-duplicates what agents send again after the restart
        assert_eq!(s.duplicates, 0, "{agent}: {s:?}");
    }
}

/// An agent pointed at a port where nothing listens stays up, logs why it cannot connect,
/// retries with backoff, and delivers once a server appears there.
#[test]
fn agent_without_a_server_keeps_retrying_then_delivers() {
    let fx = Fixture::new();
    let mut agent = fx.agent("lonely", Some("lonely"), 100);
    std::thread::sleep(Duration::from_secs(4));
    assert!(agent.running(), "agent exited: {}", agent.log_text());
    let log = agent.log_text();
    let failures = log.matches("connection to server failed").count();
    assert!(
        failures >= 3,
        "expected repeated retries, got {failures}:\n{log}"
    );
    assert!(log.contains("refused"), "the log must say why: {log}");
    // backoff: with 100ms..1s, 4 s allow far fewer than the 40 attempts of a fixed 100 ms
    assert!(failures < 25, "no backoff? {failures} attempts in 4 s");

    let _server = fx.serve(None, "server");
    wait_until(
        Duration::from_secs(20),
        "records queued while no server listened",
        || {
            summary(&fx.data, "lonely", "heartbeat")
                .is_some_and(|s| s.records >= 40 && s.first_seq == 1)
        },
    );
}

/// `GET /metrics` on the server's metrics endpoint: what the sink wrote, its lag, in the
/// Prometheus text format.
#[test]
fn metrics_endpoint_reports_records_written_and_sink_lag() {
    use std::io::{Read, Write};
    let fx = Fixture::new();
    let metrics_port = free_port();
    let cfg = server_config(fx.path(), fx.port, None);
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ));
    fs::write(&cfg, text).unwrap();
    let _server = Proc::start(
        &["serve", "--config", cfg.to_str().unwrap()],
        &fx.path().join("server.log"),
    );
    let agent = AgentOpts {
        id: Some("m1".into()),
        heartbeat_ms: 20,
        limit: 25,
        metrics: false,
        ..AgentOpts::default()
    };
    let _agent = fx.agent_with("m1", &agent);
    let scrape = || -> String {
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) else {
            return String::new();
        };
        let _ = conn
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut body = String::new();
        let _ = conn.read_to_string(&mut body);
        body
    };
    // 25 heartbeats plus the agent's birth message are not telemetry: 25 records archived
    wait_until(
        Duration::from_secs(30),
        "the archive sink reported 25 records written and no lag",
        || {
            let m = scrape();
            m.contains("fleetbus_sink_written_total{sink=\"archive\"} 25\n")
                && m.contains("fleetbus_sink_lag_entries{sink=\"archive\"} 0\n")
        },
    );
    let m = scrape();
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("text/plain; version=0.0.4"), "{m}");
    assert!(
        m.contains("fleetbus_sink_dead_lettered_total{sink=\"archive\"} 0\n"),
        "{m}"
    );
}
