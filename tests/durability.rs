//! End-to-end durability: real processes, killed with SIGKILL, against the file sink's
//! exactly-once guarantee.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rand::Rng;

fn exactly(data: &Path, agent: &str, n: u64) -> bool {
    summary(data, agent, "heartbeat")
        .is_some_and(|s| s.records == n && s.first_seq == 1 && s.last_seq == n && s.is_contiguous())
}

/// The newest segment file of a log directory.
fn last_segment(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .unwrap()
}

fn chop(file: &Path, bytes: u64) {
    let len = fs::metadata(file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

/// 5 agents stream 20,000 records; the server is killed with SIGKILL twice at random
/// moments and started again: the file sink ends with every record exactly once.
#[test]
fn server_killed_twice_loses_nothing_and_duplicates_nothing() {
    let fx = Fixture::new();
    let mut server = fx.serve(None, "server");
    let names: Vec<String> = (1..=5).map(|i| format!("d{i}")).collect();
    let _agents: Vec<Proc> = names
        .iter()
        .map(|n| fx.agent_with(n, &heartbeat_agent(n, 1, 4000)))
        .collect();
    let mut rng = rand::rng();
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        server.kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1000)));
        server = fx.serve(None, &format!("server-{round}"));
    }
    let done = poll_until(Duration::from_secs(90), || {
        names.iter().all(|n| exactly(&fx.data, n, 4000))
    });
    let inv = scan(&fx.data).unwrap();
    if !done {
        let tail = |name: &str| {
            let text = server.log_text();
            let _ = name;
            text.lines().rev().take(40).collect::<Vec<_>>().join("\n")
        };
        let agent_log = fs::read_to_string(fx.path().join("d1.log")).unwrap_or_default();
        panic!(
            "not 4000 records from each of the 5 agents, exactly once, within 90 s: {:#?}\nserver log (newest first):\n{}\nagent d1 log (last lines):\n{}",
            inv.streams,
            tail("server"),
            agent_log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
    }
    let total: u64 = inv.streams.values().map(|s| s.records).sum();
    assert_eq!(total, 20_000, "{:#?}", inv.streams);
    assert!(inv
        .streams
        .values()
        .all(|s| s.duplicates == 0 && s.missing == 0));
}

/// A sink that always fails hands its batches to its dead-letter sink, with the error; the
/// other sink gets everything.
#[test]
fn an_always_failing_sink_feeds_its_dead_letter_sink() {
    let fx = Fixture::new();
    let rules = r#"
[sinks.good]
type = "file"
path = "good/{agent}.jsonl"

[sinks.broken]
type = "file"
path = "blocker/{agent}.jsonl"
dead_letter = "dead"
batch.max_attempts = 2
batch.retry_backoff = "10ms"

[sinks.dead]
type = "file"
path = "dead/{agent}.jsonl"

[[rules]]
name = "both"
from = ["fleet/+/telemetry/#"]
to = ["good", "broken"]
"#;
    fs::create_dir_all(&fx.data).unwrap();
    fs::write(
        fx.data.join("blocker"),
        "a file where the sink needs a directory",
    )
    .unwrap();
    let _server = fx.serve(Some(rules), "server");
    let _agent = fx.agent_with("dl", &heartbeat_agent("dl", 5, 200));
    let dead_file = fx.data.join("dead/dl.jsonl");
    let dead_lines = || {
        fs::read_to_string(&dead_file)
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        "200 good records and 200 dead letters",
        || exactly(&fx.data.join("good"), "dl", 200) && dead_lines() == 200,
    );
    let dead: Vec<serde_json::Value> = fs::read_to_string(&dead_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = dead
        .iter()
        .map(|d| d["record"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    assert!(dead.iter().all(|d| d["dead_letter"]["sink"] == "broken"
        && d["dead_letter"]["error"]
            .as_str()
            .unwrap()
            .contains("blocker")));
}

/// The agent's outbox fills while the server is away: the oldest records are dropped, the
/// agent reports how many, and everything after them arrives.
#[test]
fn outbox_overflow_while_the_server_is_away_is_reported_and_the_rest_arrives() {
    let fx = Fixture::new();
    let opts = AgentOpts {
        outbox_max_bytes: Some(64 * 1024),
        ..heartbeat_agent("ov", 2, 1500)
    };
    let mut agent = fx.agent_with("ov", &opts);
    wait_until(
        Duration::from_secs(20),
        "the agent to produce its 1500 records",
        || agent.log_text().contains("heartbeat limit reached"),
    );
    assert!(
        agent.log_text().contains("outbox full"),
        "{}",
        agent.log_text()
    );
    let _server = fx.serve(None, "server");
    wait_until(Duration::from_secs(20), "the overflow report", || {
        summary(&fx.data, "ov", "events").is_some()
    });
    let events = records(&fx.data.join("telemetry/ov/events"));
    let dropped: u64 = events
        .iter()
        .filter(|e| e["event"]["class"] == "fleetbus.outbox.overflow")
        .map(|e| e["fields"]["dropped"].as_u64().unwrap())
        .sum();
    assert!(dropped > 0);
    assert_eq!(events[0]["event"]["severity"], 4);
    wait_until(
        Duration::from_secs(20),
        "every record after the dropped ones",
        || summary(&fx.data, "ov", "heartbeat").is_some_and(|s| s.last_seq == 1500),
    );
    let s = summary(&fx.data, "ov", "heartbeat").unwrap();
    assert!(s.is_contiguous(), "{s:?}");
    assert_eq!(
        s.first_seq - 1,
        dropped,
        "the report counts exactly the records that are missing"
    );
    assert_eq!(s.records + dropped, 1500);
    agent.terminate(Duration::from_secs(10));
}

/// Torn writes: the last bytes of the server's write-ahead log and of the agent's outbox are
/// cut while both are down; both start again, recover up to the last whole record, and
/// keep working.
#[test]
fn torn_tails_of_the_wal_and_the_outbox_are_cut_and_work_goes_on() {
    let fx = Fixture::new();
    let mut server = fx.serve(None, "server");
    let mut agent = fx.agent_with("tt", &heartbeat_agent("tt", 5, 300));
    wait_until(Duration::from_secs(30), "300 records", || {
        exactly(&fx.data, "tt", 300)
    });
    agent.kill();
    server.kill();
    chop(&last_segment(&fx.data.join("wal")), 3);
    chop(&last_segment(&fx.path().join("state-tt/outbox")), 3);

    let server = fx.serve(None, "server-2");
    wait_until(Duration::from_secs(10), "the server to start again", || {
        server.log_text().contains("fleetbus server ready")
    });
    assert!(
        server.log_text().contains("cut a torn or corrupt tail"),
        "{}",
        server.log_text()
    );
    let mut agent = fx.agent_with("tt", &heartbeat_agent("tt", 5, 100));
    wait_until(
        Duration::from_secs(30),
        "100 more records after the restart",
        || summary(&fx.data, "tt", "heartbeat").is_some_and(|s| s.records >= 400),
    );
    assert!(
        agent.log_text().contains("cut a torn record"),
        "{}",
        agent.log_text()
    );
    agent.terminate(Duration::from_secs(10));
    let s = summary(&fx.data, "tt", "heartbeat").unwrap();
    // every record before the cut had been delivered: nothing missing, nothing twice. The
    // outbox lost its last (delivered) record to the cut, so its number is given again, to
    // a new record under a new epoch: 400 distinct records, numbers 1 to 399
    assert!(
        s.is_contiguous() && s.first_seq == 1 && s.records == 400,
        "{s:?}"
    );
    let epochs: std::collections::BTreeSet<u64> = records(&fx.data)
        .iter()
        .map(|r| r["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs.len(), 2, "the cut started a new outbox epoch");
}

/// The file sink's directory is unusable for 30 s: the records wait in the server's log
/// and all arrive when it is back, with no duplicates.
#[test]
fn a_sink_destination_unavailable_for_30_s_loses_and_duplicates_nothing() {
    let fx = Fixture::new();
    let _server = fx.serve(None, "server");
    let mut agent = fx.agent_with("un", &heartbeat_agent("un", 20, 2500));
    wait_until(Duration::from_secs(20), "first records", || {
        summary(&fx.data, "un", "heartbeat").is_some_and(|s| s.records >= 100)
    });
    // root ignores permissions, so make the directory unusable by putting a file in its place
    let dir = fx.data.join("telemetry");
    let away = fx.data.join("telemetry.away");
    fs::rename(&dir, &away).unwrap();
    fs::write(&dir, "not a directory").unwrap();
    std::thread::sleep(Duration::from_secs(30));
    assert!(agent.running());
    let log = fs::read_to_string(fx.path().join("server.log")).unwrap();
    assert!(log.contains("sink write failed; retrying"), "{log}");
    fs::remove_file(&dir).unwrap();
    fs::rename(&away, &dir).unwrap();
    wait_until(
        Duration::from_secs(60),
        "all 2500 records exactly once",
        || exactly(&fx.data, "un", 2500),
    );
    agent.terminate(Duration::from_secs(10));
}

/// A proxy between the agents and the broker cuts every connection at random moments for
/// 60 s: nothing is lost and nothing is stored twice.
#[test]
fn connections_cut_at_random_for_60_s_lose_and_duplicate_nothing() {
    let fx = Fixture::new();
    let _server = fx.serve(None, "server");
    fx.wait_listening();
    let proxy = ChaosProxy::start(fx.port, 200, 2000);
    let names = ["p1", "p2"];
    let _agents: Vec<Proc> = names
        .iter()
        .map(|n| {
            let opts = AgentOpts {
                port: Some(proxy.port),
                ack_timeout_ms: 1000,
                ..heartbeat_agent(n, 10, 6000)
            };
            fx.agent_with(n, &opts)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(60));
    proxy.calm();
    let cuts = proxy.cuts.load(std::sync::atomic::Ordering::Relaxed);
    assert!(cuts >= 30, "the proxy cut connections only {cuts} times");
    wait_until(
        Duration::from_secs(60),
        "6000 records from each agent, exactly once",
        || names.iter().all(|n| exactly(&fx.data, n, 6000)),
    );
}

#[test]
fn a_graceful_stop_hands_on_everything_the_broker_accepted() {
    use rumqttc::{Event, Packet, QoS};

    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut server = ServeProc::start(
        dir.path(),
        &format!(
            "data_dir = \"data\"\n{}[broker]\nlisten = \"127.0.0.1:{port}\"\n",
            common::admin_table()
        ),
        move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    // third-party publishers: QoS 1 and no fleetbus acknowledgements, so the broker's
    // PUBACK is all they are told, and a message it got must not be lost by a stop. Eight
    // at once, so the stop comes right after a burst (the broker test
    // `a_drain_mark_comes_after_every_message_stored_before_it` holds a backlog for sure).
    const PUBLISHERS: usize = 8;
    const EACH: usize = 2000;
    const N: usize = PUBLISHERS * EACH;
    let padding = "x".repeat(400);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let padding = padding.clone();
            std::thread::spawn(move || {
                let options =
                    rumqttc::MqttOptions::new(format!("ext-publisher-{p}"), "127.0.0.1", port);
                let (client, mut connection) = rumqttc::Client::new(options, 256);
                let sender = std::thread::spawn(move || {
                    for i in p * EACH..(p + 1) * EACH {
                        let body = format!("{{\"i\":{i},\"pad\":\"{padding}\"}}");
                        client
                            .publish("fleet/ext/telemetry/burst", QoS::AtLeastOnce, false, body)
                            .unwrap();
                    }
                    client
                });
                let mut acked = 0;
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked += 1;
                            if acked == EACH {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            panic!("publisher lost its connection after {acked} PUBACKs: {e}")
                        }
                    }
                }
                sender.join().unwrap()
            })
        })
        .collect();
    let _clients: Vec<_> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    // the stop comes right after the last PUBACK, before the engine may have seen it all
    server.terminate();
    let log = server.log();
    let mut seen = std::collections::BTreeSet::new();
    for record in common::records(&dir.path().join("data/telemetry/ext/burst")) {
        assert!(
            seen.insert(record["i"].as_u64().unwrap()),
            "duplicate {record}"
        );
    }
    assert_eq!(
        seen.len(),
        N,
        "records in the sink after the stop; log:\n{log}"
    );
    assert!(log.contains("server stopped"), "{log}");
    assert!(!log.contains("still running"), "{log}");
}
