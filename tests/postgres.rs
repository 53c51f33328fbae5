//! The PostgreSQL sink end to end, with real processes: `fleetbus serve`, five agents and a
//! PostgreSQL server (Debian's package, a cluster the test makes in a temp directory).
//! - Both servers killed with SIGKILL twice while the agents stream: every (agent, seq)
//!   lands in the table exactly once.
//! - PostgreSQL stopped for 30 s mid-stream: a file sink beside it keeps writing
//!   meanwhile, and afterwards everything is in the table, nothing twice.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use fleetbus_testkit::postgres::{Postgres, PG_PASSWORD};
use rand::Rng;

/// Rules sending heartbeats to the `pg` sink, and with `also_file` to a file sink too.
fn rules(dir: &Path, pg: &Postgres, also_file: bool) -> String {
    let pw = dir.join("pg-password");
    std::fs::write(&pw, PG_PASSWORD).unwrap();
    let mut text = format!(
        r#"
[sinks.pg]
type = "postgres"
url = "{}"
password = {{ file = "{}" }}
timeout = "5s"
batch.retry_backoff_max = "1s"
"#,
        pg.url(),
        pw.display()
    );
    let mut to = vec!["\"pg\""];
    if also_file {
        text.push_str(
            "\n[sinks.files]\ntype = \"file\"\npath = \"telemetry/{agent}/{stream}/%Y-%m-%d.jsonl\"\n",
        );
        to.push("\"files\"");
    }
    text.push_str(&format!(
        "\n[[rules]]\nname = \"heartbeats\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [{}]\n",
        to.join(", ")
    ));
    text
}

/// `sql`'s rows as text lines (psql, unaligned), or None while PostgreSQL does not answer.
fn query(pg: &Postgres, sql: &str) -> Option<String> {
    let out = Command::new(pg.bin().join("psql"))
        .arg(pg.url_with_password())
        .args(["-X", "-A", "-t", "-c", sql])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Per agent: rows, distinct seqs, lowest and highest seq of its heartbeats.
fn per_agent(pg: &Postgres) -> Option<String> {
    query(
        pg,
        "SELECT agent, count(*), count(DISTINCT seq), min(seq), max(seq) FROM messages \
         WHERE stream = 'heartbeat' GROUP BY agent ORDER BY agent",
    )
}

/// What the table must hold at the end: `n` heartbeats of each agent, 1..=n, once.
fn exactly(names: &[String], n: u64) -> String {
    names
        .iter()
        .map(|a| format!("{a}|{n}|{n}|1|{n}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn postgres_and_the_server_killed_twice_while_5_agents_stream_lose_and_duplicate_nothing() {
    let Some(mut pg) = Postgres::start().unwrap() else {
        return;
    };
    let fx = Fixture::new();
    let rules = rules(fx.path(), &pg, false);
    let metrics_port = free_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    let mut server = fx.serve_with(Some(&rules), "server", &metrics);
    let names: Vec<String> = (1..=5).map(|i| format!("d{i}")).collect();
    let _agents: Vec<Proc> = names
        .iter()
        .map(|n| fx.agent_with(n, &heartbeat_agent(n, 1, 4000)))
        .collect();
    let mut rng = rand::rng();
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        pg.kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
        server.kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
        pg.restart().unwrap();
        server = fx.serve_with(Some(&rules), &format!("server-{round}"), &metrics);
    }
    let want = exactly(&names, 4000);
    let mut seen = None;
    let done = poll_until(Duration::from_secs(120), || {
        seen = per_agent(&pg);
        seen.as_deref() == Some(want.as_str())
    });
    assert!(
        done,
        "not 4000 heartbeats of each agent exactly once within 120 s: agent|rows|distinct|min|max\n{}\nserver log (last lines):\n{}",
        seen.unwrap_or_default(),
        server.log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    // the kills happened while writes were going on
    let logs: String = ["server", "server-0"]
        .iter()
        .map(|l| std::fs::read_to_string(fx.path().join(format!("{l}.log"))).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("sink write failed; retrying"),
        "PostgreSQL's kill was noticed"
    );
}

#[test]
fn postgres_stopped_for_30_s_delays_only_its_own_sink_and_loses_nothing() {
    let Some(mut pg) = Postgres::start().unwrap() else {
        return;
    };
    let fx = Fixture::new();
    let metrics_port = free_port();
    let _server = fx.serve_with(
        Some(&rules(fx.path(), &pg, true)),
        "server",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let mut agent = fx.agent_with("un", &heartbeat_agent("un", 10, 4000));
    let names = vec!["un".to_string()];
    let count = || {
        query(&pg, "SELECT count(*) FROM messages")
            .and_then(|c| c.parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), "first rows", || count() >= 100);
    pg.stop();
    let in_files_at_stop = summary(&fx.data, "un", "heartbeat").map_or(0, |s| s.records);
    std::thread::sleep(Duration::from_secs(30));
    // the file sink went on meanwhile: 30 s of heartbeats every 10 ms, most of them
    let in_files = summary(&fx.data, "un", "heartbeat").map_or(0, |s| s.records);
    assert!(
        in_files >= in_files_at_stop + 1000,
        "the file sink stalled with PostgreSQL: {in_files_at_stop} -> {in_files}"
    );
    let log = std::fs::read_to_string(fx.path().join("server.log")).unwrap();
    assert!(log.contains("sink write failed; retrying"), "{log}");
    pg.restart().unwrap();
    let want = exactly(&names, 4000);
    let mut seen = None;
    let done = poll_until(Duration::from_secs(90), || {
        seen = per_agent(&pg);
        seen.as_deref() == Some(want.as_str())
    });
    assert!(
        done,
        "not 4000 heartbeats exactly once within 90 s of PostgreSQL's return: {}",
        seen.unwrap_or_default()
    );
    assert!(summary(&fx.data, "un", "heartbeat")
        .is_some_and(|s| s.records == 4000 && s.is_contiguous()));
    agent.terminate(Duration::from_secs(10));
}

/// Destinations that cannot be reached when the server starts (nothing listens on their
/// ports): the server starts anyway, says so for each sink, and keeps their messages.
#[test]
fn unreachable_destinations_at_start_are_logged_and_do_not_stop_the_server() {
    let fx = Fixture::new();
    let (pg_port, http_port) = (free_port(), free_port());
    std::fs::write(fx.path().join("pw"), "x").unwrap();
    let rules = format!(
        r#"
[sinks.pg]
type = "postgres"
url = "postgres://fleet@127.0.0.1:{pg_port}/fleet"
password = {{ file = "{}" }}

[sinks.hook]
type = "http"
url = "http://127.0.0.1:{http_port}/ingest"

[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["pg", "hook"]
"#,
        fx.path().join("pw").display()
    );
    let server = fx.serve(Some(&rules), "server");
    fx.wait_listening();
    wait_until(Duration::from_secs(20), "both warnings", || {
        let log = server.log_text();
        log.contains("postgres sink: database not reachable at start")
            && log.contains("http sink: receiver not reachable at start")
    });
    let log = server.log_text();
    assert!(log.contains(&format!("127.0.0.1:{pg_port}")), "{log}");
}
