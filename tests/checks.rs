//! End to end: an in-process agent runs Nagios-style plugins (shell scripts written here)
//! and its results reach a real `fleetbus serve` as records, through the rules engine to a
//! file sink: the right state for every exit, the performance data of every line as
//! metrics, a hung plugin and one whose child ignores SIGTERM ended with nothing left
//! behind, and an event only where a HARD state changes.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Fixture;
use fleetbus_agent::checks::CheckConfig;
use fleetbus_agent::{Agent, AgentConfig};
use serde_json::Value;
use tokio::sync::watch;

const RULES: &str = r#"
[sinks.out]
type = "file"
path = "out/{stream}.jsonl"

[[rules]]
name = "checks"
from = ["fleet/+/telemetry/checks", "fleet/+/telemetry/events"]
to = ["out"]
"#;

/// Writes an executable shell script `name` in `dir`.
fn plugin(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn check(command: &[&str], max_attempts: u32) -> CheckConfig {
    let mut c = CheckConfig::new(command, Duration::from_secs(1));
    c.max_attempts = max_attempts;
    c.timeout = Duration::from_secs(5);
    c
}

/// The records of `stream` the sink wrote, by check name.
fn by_check(dir: &Path, stream: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let text = fs::read_to_string(dir.join(format!("data/out/{stream}.jsonl"))).unwrap_or_default();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let name = record["check"]["name"].as_str().unwrap().to_string();
        out.entry(name).or_default().push(record);
    }
    out
}

/// Whether process `pid` is gone (a zombie waiting for its reaper counts as gone).
fn gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_results_arrive_as_records_with_their_states_metrics_and_only_hard_events() {
    let fx = Fixture::new();
    let dir = fx.path();
    let mut serve = fx.serve(Some(RULES), "serve");
    fx.wait_listening();

    let plugins = dir.join("plugins");
    fs::create_dir(&plugins).unwrap();
    let multi = plugin(
        &plugins,
        "multi",
        "echo \"DISK OK - free space: / 3326 MB (56%); | '/ used'=2643MB;5948;5958;0;5968\"\n\
         echo '/ 15272 MB (77%);'\n\
         echo '/boot 68 MB (69%); | /boot=68MB;88;93;0;98'\n\
         echo \"'it''s'=1.5s;~:2;@3:4 load=U\"\n\
         exit 0",
    );
    let pidfile = dir.join("stubborn.pid");
    let stubborn = plugin(
        &plugins,
        "stubborn",
        &format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 0.05; done' &\nsleep 30",
            pidfile.display()
        ),
    );
    let mut config = AgentConfig {
        server: format!("mqtt://127.0.0.1:{}", fx.port).parse().unwrap(),
        state_dir: dir.join("state"),
        id: Some("node-1".into()),
        ..AgentConfig::default()
    };
    config.metrics.enabled = false;
    config.heartbeat.enabled = false;
    config.connection.backoff_min = Duration::from_millis(100);
    config.check_runner.kill_grace = Duration::from_millis(300);
    let checks = &mut config.checks;
    checks.insert("multi".into(), check(&[multi.to_str().unwrap()], 3));
    checks.insert(
        "warn".into(),
        check(&["sh", "-c", "echo 'LOAD WARNING - 7.1'; exit 1"], 2),
    );
    checks.insert(
        "crit".into(),
        check(&["sh", "-c", "echo 'HTTP CRITICAL'; exit 2"], 1),
    );
    checks.insert("unknown".into(), check(&["sh", "-c", "exit 3"], 1));
    checks.insert(
        "exit42".into(),
        check(&["sh", "-c", "echo odd >&2; exit 42"], 1),
    );
    checks.insert("missing".into(), check(&["/nonexistent/check_thing"], 1));
    checks.insert("noexec".into(), check(&["sh", "-c", "exec /dev/null"], 1));
    checks.insert("signal".into(), check(&["sh", "-c", "kill -9 $$"], 1));
    let mut hang = check(&["sleep", "30"], 1);
    hang.timeout = Duration::from_millis(300);
    checks.insert("hang".into(), hang);
    let mut stubborn = check(&[stubborn.to_str().unwrap()], 1);
    stubborn.timeout = Duration::from_millis(300);
    checks.insert("stubborn".into(), stubborn);
    let mut port = CheckConfig::new(&[], Duration::from_secs(1));
    port.tcp = Some(fleetbus_agent::checks::builtin::TcpCheck {
        address: format!("127.0.0.1:{}", fx.port),
    });
    checks.insert("broker-port".into(), port);
    let names: Vec<String> = checks.keys().cloned().collect();

    let agent = Agent::open(fleetbus_agent::Valid::new(config).unwrap()).unwrap();
    let runner = agent.checks().clone();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { agent.run(rx).await.unwrap() });

    // three results of every check (each runs every second, at its own phase)
    let arrived = common::poll_until(Duration::from_secs(30), || {
        let results = by_check(dir, "checks");
        names
            .iter()
            .all(|n| results.get(n).is_some_and(|r| r.len() >= 3))
    });
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let results = by_check(dir, "checks");
    assert!(
        arrived,
        "results: {:?}",
        results
            .iter()
            .map(|(n, r)| (n, r.len()))
            .collect::<Vec<_>>()
    );

    let status = |name: &str| results[name][0]["check"]["status"].as_u64().unwrap();
    let reason = |name: &str| {
        results[name][0]["check"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    for (name, code) in [
        ("multi", 0),
        ("warn", 1),
        ("crit", 2),
        ("unknown", 3),
        ("broker-port", 0),
    ] {
        assert_eq!(status(name), code, "{name}");
        assert!(reason(name).is_empty(), "{name}: {}", reason(name));
    }
    for (name, why) in [
        ("exit42", "exit 42: not a plugin state"),
        ("missing", "cannot start `/nonexistent/check_thing`"),
        ("noexec", "exit 126"),
        ("signal", "killed by signal 9"),
        ("hang", "timed out after 300ms"),
        ("stubborn", "timed out after 300ms"),
    ] {
        assert_eq!(status(name), 3, "{name}");
        assert!(reason(name).contains(why), "{name}: {}", reason(name));
    }
    assert!(results["exit42"][0]["check"]["stderr"]
        .as_str()
        .unwrap()
        .contains("odd"));

    // the multi-line plugin: text, long text and the performance data of every line
    let m = &results["multi"][0];
    assert_eq!(
        m["check"]["output"],
        "DISK OK - free space: / 3326 MB (56%);"
    );
    assert_eq!(
        m["check"]["long_output"],
        "/ 15272 MB (77%);\n/boot 68 MB (69%);"
    );
    let metrics: Vec<(String, Value, Value, Value, Value)> = m["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            assert_eq!(x["labels"]["check"], "multi");
            (
                x["name"].as_str().unwrap().to_string(),
                x["value"].clone(),
                x["unit"].clone(),
                x["warn"].clone(),
                x["crit"].clone(),
            )
        })
        .collect();
    assert_eq!(
        metrics,
        vec![
            (
                "/ used".into(),
                2643.0.into(),
                "MB".into(),
                "5948".into(),
                "5958".into()
            ),
            (
                "/boot".into(),
                68.0.into(),
                "MB".into(),
                "88".into(),
                "93".into()
            ),
            (
                "it's".into(),
                1.5.into(),
                "s".into(),
                "~:2".into(),
                "@3:4".into()
            ),
            (
                "load".into(),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null
            ),
        ]
    );

    // SOFT, then HARD on the last attempt
    let warn: Vec<(&str, u64)> = results["warn"][..2]
        .iter()
        .map(|r| {
            (
                r["check"]["state_type"].as_str().unwrap(),
                r["check"]["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(warn, vec![("soft", 1), ("hard", 2)]);

    // events: exactly one per check whose problem turned HARD, none for the OK one
    let events = by_check(dir, "events");
    let fine = ["multi", "broker-port"];
    for name in fine {
        assert!(!events.contains_key(name), "{:?}", events.get(name));
    }
    // the built-in's result: its text and its time as a metric
    let port = &results["broker-port"][0];
    assert!(
        port["check"]["output"]
            .as_str()
            .unwrap()
            .starts_with("TCP OK - "),
        "{port}"
    );
    assert_eq!(port["metrics"][0]["name"], "time");
    assert_eq!(port["metrics"][0]["unit"], "s");
    for name in names.iter().filter(|n| !fine.contains(&n.as_str())) {
        let e = &events[name.as_str()];
        assert_eq!(e.len(), 1, "{name}: {e:?}");
        assert_eq!(e[0]["event"]["class"], "check.state");
        assert_eq!(e[0]["event"]["rule"], name.as_str());
        assert_eq!(e[0]["check"]["previous"], 0, "{name}");
        assert_eq!(e[0]["check"]["state_type"], "hard", "{name}");
    }
    assert_eq!(events["crit"][0]["event"]["severity"], 4);
    assert_eq!(
        events["crit"][0]["event"]["text"],
        "crit: CRITICAL: HTTP CRITICAL"
    );
    assert_eq!(events["warn"][0]["event"]["severity"], 3);
    assert_eq!(events["warn"][0]["check"]["attempt"], 2);

    // the hung plugins were ended, and the child that ignored SIGTERM with them
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        common::poll_until(Duration::from_secs(5), || gone(pid)),
        "the SIGTERM-ignoring child {pid} survived"
    );
    let counts = runner.counts();
    assert!(counts.timed_out >= 6, "{counts:?}");
    assert_eq!(counts.unstored, 0);
    serve.terminate(Duration::from_secs(10));
}

/// Passive results submitted with `fleetbus agent submit` while the server is down wait in
/// the agent's outbox and arrive, in order, once it is back; a passive check that hears
/// nothing turns UNKNOWN; a result for a check that is not configured is refused.
#[test]
fn submitted_results_survive_a_server_outage_and_silence_turns_unknown() {
    let fx = Fixture::new();
    let dir = fx.path();
    let mut serve = fx.serve(Some(RULES), "serve");
    fx.wait_listening();
    let opts = common::AgentOpts {
        id: Some("node-2".into()),
        metrics: false,
        heartbeat_ms: 3_600_000,
        ..common::AgentOpts::default()
    };
    let config = common::agent_config_opts(dir, "agent", fx.port, &opts);
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(
        "[checks.backup]\nmax_attempts = 2\n\
         [checks.feed]\nfreshness = \"1s\"\nmax_attempts = 1\n\
         [check_runner]\nsubmit_poll = \"100ms\"\n",
    );
    fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap().to_string();
    let _agent = common::Proc::start(&["agent", "--config", &config], &dir.join("agent.log"));

    // silence: UNKNOWN, with why, and its HARD change as an event
    common::wait_until(Duration::from_secs(20), "a stale result of `feed`", || {
        by_check(dir, "checks").contains_key("feed")
    });
    let stale = &by_check(dir, "checks")["feed"][0];
    assert_eq!(stale["check"]["status"], 3);
    assert!(
        stale["check"]["reason"]
            .as_str()
            .unwrap()
            .contains("no result submitted for 1s"),
        "{stale}"
    );

    serve.terminate(Duration::from_secs(10));
    let submit = |status: &str, output: &str| {
        std::process::Command::new(common::bin())
            .args([
                "agent", "--config", &config, "submit", "--check", "backup", "--status", status,
                "--output", output,
            ])
            .output()
            .unwrap()
    };
    for (status, output) in [
        (
            "2",
            "BACKUP CRITICAL - last run failed | age=90000s;86400;172800;0",
        ),
        ("2", "BACKUP CRITICAL - still failing"),
        ("0", "BACKUP OK - done\nsnapshot 41 kept | size=12GB"),
    ] {
        let out = submit(status, output);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refused = std::process::Command::new(common::bin())
        .args([
            "agent", "--config", &config, "submit", "--check", "nope", "--status", "1",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("no check `nope`") && why.contains("backup, feed"),
        "{why}"
    );
    // the agent takes them in (into its outbox) while the server is away
    let submitted = dir.join("state-agent/checks/submitted");
    common::wait_until(Duration::from_secs(10), "the submissions taken in", || {
        fs::read_dir(&submitted)
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    });

    let _serve = fx.serve(Some(RULES), "serve-again");
    common::wait_until(Duration::from_secs(30), "three backup results", || {
        by_check(dir, "checks")
            .get("backup")
            .is_some_and(|r| r.len() == 3)
    });
    let backup = &by_check(dir, "checks")["backup"];
    let got: Vec<(u64, &str, bool)> = backup
        .iter()
        .map(|r| {
            (
                r["check"]["status"].as_u64().unwrap(),
                r["check"]["state_type"].as_str().unwrap(),
                r["check"]["passive"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(2, "soft", true), (2, "hard", true), (0, "hard", true)]
    );
    let age = &backup[0]["metrics"][0];
    assert_eq!(
        (
            age["name"].as_str(),
            age["value"].as_f64(),
            age["unit"].as_str()
        ),
        (Some("age"), Some(90000.0), Some("s"))
    );
    assert_eq!(age["warn"], "86400");
    assert_eq!(backup[2]["check"]["long_output"], "snapshot 41 kept");
    assert!(common::ts(&backup[0]) < common::ts(&backup[2]));

    let events = by_check(dir, "events");
    let backup_events: Vec<(u64, bool)> = events["backup"]
        .iter()
        .map(|e| {
            (
                e["check"]["status"].as_u64().unwrap(),
                e["event"]["clear"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(backup_events, vec![(2, false), (0, true)]);
    assert_eq!(events["feed"][0]["check"]["status"], 3);
}
