//! Reloading the rules under load: five agents stream while the rules change ten times
//! (sinks added, changed, removed, a rule with a transform and one with a throttle, and one
//! broken version). Each record lands, exactly once, in the sinks the engine routed it to
//! when it was accepted (what `dispatch` answered), in real SQLite databases and a file
//! sink; the broken version changes nothing; the unchanged sink is never restarted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::wait_for;
use fleetbus_pipeline::{Dispatched, Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;

/// Per sink, the (agent, seq) of every record the engine routed to it.
type Routed = BTreeMap<String, BTreeSet<(String, u64)>>;

/// `[sinks.NAME]` of a SQLite sink writing `NAME.sqlite`, with `extra` keys.
fn db(name: &str, extra: &str) -> String {
    format!("[sinks.{name}]\ntype = \"sqlite\"\npath = \"{name}.sqlite\"\n{extra}\n")
}

fn rule(name: &str, from: &str, to: &str, extra: &str) -> String {
    format!("[[rules]]\nname = \"{name}\"\nfrom = [\"{from}\"]\nto = [\"{to}\"]\n{extra}\n")
}

const ARCHIVE: &str = "[sinks.archive]\ntype = \"file\"\npath = \"archive/{agent}.jsonl\"\n";

/// The versions of the rules file, in order; `None` is the broken one.
fn versions() -> Vec<Option<String>> {
    let all = |to: &str| rule(&format!("all-{to}"), "fleet/+/telemetry/#", to, "");
    let archive = rule("archive", "fleet/+/telemetry/#", "archive", "");
    vec![
        // 1: a second database for the even agents
        Some(format!(
            "{ARCHIVE}{}{}{archive}{}{}",
            db("a", ""),
            db("b", ""),
            all("a"),
            rule(
                "even",
                "fleet/+/telemetry/#",
                "b",
                "where = 'agent in [\"a0\", \"a2\", \"a4\"]'"
            )
        )),
        // 2: database a changed (smaller batches): its worker restarts
        Some(format!(
            "{ARCHIVE}{}{}{archive}{}{}",
            db("a", "batch.max_events = 7"),
            db("b", ""),
            all("a"),
            rule(
                "even",
                "fleet/+/telemetry/#",
                "b",
                "where = 'agent in [\"a0\", \"a2\", \"a4\"]'"
            )
        )),
        // 3: broken
        None,
        // 4: b removed, c added with a transform
        Some(format!(
            "{ARCHIVE}{}{}{archive}{}{}",
            db("a", "batch.max_events = 7"),
            db("c", ""),
            all("a"),
            rule(
                "odd",
                "fleet/+/telemetry/#",
                "c",
                "where = 'agent in [\"a1\", \"a3\"]'\nset = { odd = \"true\" }"
            )
        )),
        // 5: a throttle in front of c
        Some(format!(
            "{ARCHIVE}{}{}{archive}{}{}",
            db("a", "batch.max_events = 7"),
            db("c", ""),
            all("a"),
            rule(
                "odd",
                "fleet/+/telemetry/#",
                "c",
                "throttle = { key = \"agent\", rate = \"50/1s\" }"
            )
        )),
        // 6: c changed
        Some(format!(
            "{ARCHIVE}{}{}{archive}{}{}",
            db("a", "batch.max_events = 7"),
            db("c", "batch.max_events = 3"),
            all("a"),
            rule(
                "odd",
                "fleet/+/telemetry/#",
                "c",
                "throttle = { key = \"agent\", rate = \"50/1s\" }"
            )
        )),
        // 7: a back to its first configuration, d added for everything
        Some(format!(
            "{ARCHIVE}{}{}{}{archive}{}{}{}",
            db("a", ""),
            db("c", "batch.max_events = 3"),
            db("d", ""),
            all("a"),
            all("d"),
            rule(
                "odd",
                "fleet/+/telemetry/#",
                "c",
                "throttle = { key = \"agent\", rate = \"50/1s\" }"
            )
        )),
        // 8: nothing but the rules' order changes
        Some(format!(
            "{ARCHIVE}{}{}{}{}{archive}{}{}",
            db("a", ""),
            db("c", "batch.max_events = 3"),
            db("d", ""),
            all("d"),
            all("a"),
            rule(
                "odd",
                "fleet/+/telemetry/#",
                "c",
                "throttle = { key = \"agent\", rate = \"50/1s\" }"
            )
        )),
        // 9: c and d removed
        Some(format!("{ARCHIVE}{}{archive}{}", db("a", ""), all("a"))),
        // 10: only the archive
        Some(format!("{ARCHIVE}{}{archive}", db("a", ""))),
    ]
}

/// (agent, seq) of every row of `NAME.sqlite` (the seq from the message as written).
fn rows(dir: &Path, name: &str) -> Vec<(String, u64)> {
    let conn = rusqlite::Connection::open(dir.join(format!("{name}.sqlite"))).unwrap();
    let mut stmt = conn
        .prepare("SELECT agent, json_extract(message, '$.seq') FROM messages ORDER BY rowid")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_once_in_the_sinks_they_were_routed_to_across_ten_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let first = format!(
        "{ARCHIVE}{}{}",
        db("a", ""),
        rule("archive", "fleet/+/telemetry/#", "archive", "")
            + &rule("all-a", "fleet/+/telemetry/#", "a", "")
    );
    let set = RuleSet::parse(Path::new("rules.toml"), &first).unwrap();
    let engine = Arc::new(
        Engine::start(
            set,
            dir.path(),
            EngineOptions::default(),
            Publisher::new(|_, _| Ok(())),
        )
        .await
        .unwrap(),
    );
    // five agents: each record is sent until accepted (as an agent does), and the sinks
    // the engine routed it to are noted
    let routed: Arc<Mutex<Routed>> = Arc::default();
    let streaming = Arc::new(AtomicBool::new(true));
    let mut agents = Vec::new();
    for a in 0..5 {
        let (engine, routed, streaming) = (engine.clone(), routed.clone(), streaming.clone());
        agents.push(std::thread::spawn(move || {
            let agent = format!("a{a}");
            let topic = format!("fleet/{agent}/telemetry/app");
            let mut seq = 0u64;
            while streaming.load(Ordering::Relaxed) {
                seq += 1;
                let payload = format!(r#"{{"seq":{seq},"epoch":9,"n":{seq}}}"#);
                loop {
                    match engine.dispatch_routed(&topic, payload.as_bytes()) {
                        Dispatched::Appended { sinks, .. } => {
                            let mut routed = routed.lock().unwrap();
                            for s in sinks {
                                routed.entry(s).or_default().insert((agent.clone(), seq));
                            }
                            break;
                        }
                        Dispatched::Refused => std::thread::sleep(Duration::from_millis(5)),
                        other => panic!("record {seq} of {agent}: {other:?}"),
                    }
                }
                if seq.is_multiple_of(4) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            seq
        }));
    }
    let archive_position = || engine.sink_position("archive").unwrap();
    let mut generation = 1;
    for (n, version) in versions().into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(text) = version else {
            // the broken version: refused before it reaches the engine, nothing changes
            let e = RuleSet::parse(Path::new("rules.toml"), "[[rules]]\nname = 1\n").unwrap_err();
            engine.reload_refused(&e.to_string());
            let stats = engine.stats();
            assert_eq!(stats.generation, generation);
            assert_eq!(stats.reloads.failures, 1);
            continue;
        };
        let set = RuleSet::parse(Path::new("rules.toml"), &text)
            .unwrap_or_else(|e| panic!("version {}: {e}", n + 1));
        let before = archive_position();
        let report = engine
            .reload(set)
            .await
            .unwrap_or_else(|e| panic!("version {}: {e}", n + 1));
        generation += 1;
        assert_eq!(report.generation, generation);
        assert!(
            !report.changed.contains(&"archive".to_string()),
            "{report:?}"
        );
        assert!(
            archive_position() >= before,
            "the archive's worker kept its place"
        );
        // a removed sink delivers before the next reload may bring back its name
        wait_for(
            &engine,
            Duration::from_secs(20),
            "removed sinks to deliver",
            |s| {
                report
                    .removed
                    .iter()
                    .all(|r| !s.sinks.iter().any(|(n, _)| n == r))
            },
        )
        .await;
    }
    streaming.store(false, Ordering::Relaxed);
    let sent: Vec<u64> = agents.into_iter().map(|t| t.join().unwrap()).collect();
    let routed = routed.lock().unwrap().clone();
    let total: usize = sent.iter().map(|&n| n as usize).sum();
    assert!(total > 1_000, "the agents streamed: {sent:?}");
    assert_eq!(routed["archive"].len(), total, "every record archived");
    let stats = engine.stats();
    assert_eq!((stats.generation, stats.reloads.failures), (10, 1));
    let expected_a = routed["a"].len() as u64;
    wait_for(
        &engine,
        Duration::from_secs(30),
        "the sinks to catch up",
        |s| s.written("archive") == total as u64 && s.written("a") >= expected_a,
    )
    .await;
    engine.shutdown(Duration::from_secs(10)).await;

    for name in ["a", "b", "c", "d"] {
        let want = routed.get(name).cloned().unwrap_or_default();
        assert!(!want.is_empty(), "sink {name} was routed records");
        let got = rows(dir.path(), name);
        let unique: BTreeSet<(String, u64)> = got.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "sink {name}: a record written twice"
        );
        let missing: Vec<_> = want.difference(&unique).take(5).collect();
        let extra: Vec<_> = unique.difference(&want).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "sink {name}: {} routed, {} written; missing (first 5) {missing:?}, not routed there (first 5) {extra:?}",
            want.len(),
            unique.len()
        );
    }
    // the transform's messages reached c with their field
    let conn = rusqlite::Connection::open(dir.path().join("c.sqlite")).unwrap();
    let odd: i64 = conn
        .query_row(
            "SELECT count(*) FROM messages WHERE json_extract(message, '$.odd') = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(odd > 0);
    // the file sink, never restarted, holds every record once
    let mut archived = BTreeSet::new();
    let mut lines = 0;
    for a in 0..5 {
        let text = std::fs::read_to_string(dir.path().join(format!("archive/a{a}.jsonl"))).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            archived.insert((format!("a{a}"), v["seq"].as_u64().unwrap()));
            lines += 1;
        }
    }
    assert_eq!(lines, total);
    assert!(
        archived == routed["archive"],
        "the archive holds exactly the records"
    );
}
