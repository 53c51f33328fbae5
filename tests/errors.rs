//! The command line as a new user meets it: bad input gets an error naming the file, the
//! line and the problem, and the command exits non-zero; the demo shows the product.

mod common;

use std::fs;
use std::process::{Command, Output};

use common::bin;

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn bad_rules_file_is_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    fs::write(
        &path,
        "[sinks.a]\ntype = \"file\"\npath = \"x.jsonl\"\n\n[[rules]]\nname = \"r\"\nfrom = [\"fleet/#/x\"]\nto = [\"missing\"]\n",
    )
    .unwrap();
    let out = run(&["rules", "check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let shown = path.display().to_string();
    assert!(
        err.contains(&format!("{shown}:7:9: rule `r`: bad topic filter")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{shown}:8:7: rule `r`: unknown sink `missing`")),
        "{err}"
    );

    // the same file named by a server config stops `serve` before it listens
    let cfg = dir.path().join("server.toml");
    fs::write(
        &cfg,
        "[broker]\nlisten = \"127.0.0.1:1\"\n[rules]\nfile = \"rules.toml\"\n",
    )
    .unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("{shown}:8:7")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn good_rules_file_passes_the_check() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rules.toml");
    let out = run(&["rules", "check", rules]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (6 rules, 5 sinks, 2 tests passed)"));
}

#[test]
fn bad_server_config_names_file_line_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    fs::write(
        &cfg,
        format!(
            "data_dir = \"d\"\n[broker]\nlisen = \"127.0.0.1:{}\"\n",
            common::free_port()
        ),
    )
    .unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:3:1", cfg.display())), "{err}");
    assert!(err.contains("unknown field `lisen`"), "{err}");

    fs::write(&cfg, "[broker]\nmax_payload_bytes = 1024\n").unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("broker.max_payload_bytes"),
        "{}",
        stderr(&out)
    );

    // every problem at once, each where the file sets it; nothing clamped quietly
    fs::write(
        &cfg,
        "[wal]\nsnapshot_interval = \"10ms\"\n[http]\nmax_connections = 0\n",
    )
    .unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let file = cfg.display();
    assert!(
        err.contains(&format!(
            "{file}:2:1: wal.snapshot_interval: must be at least 100ms"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:4:1: http.max_connections: must be at least 1"
        )),
        "{err}"
    );
}

#[test]
fn bad_agent_config_names_file_line_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        "server = \"mqtt://127.0.0.1:1\"\n[metrics]\ninterval = \"often\"\n",
    )
    .unwrap();
    let out = run(&["agent", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:3:12", cfg.display())), "{err}");

    fs::write(&cfg, "server = \"ftp://example.org\"\n").unwrap();
    let out = run(&["agent", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unsupported scheme `ftp`"),
        "{}",
        stderr(&out)
    );

    let out = run(&[
        "agent",
        "--config",
        dir.path().join("nope.toml").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nope.toml: cannot read"),
        "{}",
        stderr(&out)
    );
}

/// An admin or metrics address another process holds stops `serve` with an error naming
/// the key: running on without it, an operator's `fleetbus job` would reach the other
/// server.
#[test]
fn a_taken_admin_or_metrics_address_stops_the_server() {
    for key in ["admin", "metrics"] {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let cfg = dir.path().join("server.toml");
        let admin = match key {
            "admin" => String::new(),
            _ => common::admin_table(),
        };
        fs::write(
            &cfg,
            format!(
                "data_dir = \"d\"\n{admin}[broker]\nlisten = \"127.0.0.1:{}\"\n[{key}]\nlisten = \"{addr}\"\n",
                common::free_port()
            ),
        )
        .unwrap();
        let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success(), "{key}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("{key}.listen {addr}")),
            "{key}: {}",
            stderr(&out)
        );
    }
}

/// Plain words for the mistakes a first day brings: a data directory that is a file, an OS
/// error printed once, no colour codes in a log that is not a terminal, an environment
/// variable meant for the agent does not stop the server.
#[test]
fn first_day_mistakes_get_plain_messages() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    let cfg = dir.path().join("server.toml");
    fs::write(
        &cfg,
        format!(
            "data_dir = \"not-a-dir\"\n{}[broker]\nlisten = \"127.0.0.1:{}\"\n",
            common::admin_table(),
            common::free_port()
        ),
    )
    .unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("data_dir") && err.contains("exists and is not a directory"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes in a log to a file: {err:?}"
    );

    let agent = dir.path().join("agent.toml");
    fs::write(
        &agent,
        "server = \"mqtt://127.0.0.1:1\"\nstate_dir = \"not-a-dir\"\n",
    )
    .unwrap();
    let out = run(&["agent", "--config", agent.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(err.contains("exists and is not a directory"), "{err}");

    // a missing file: the OS error once
    let out = run(&[
        "rules",
        "check",
        dir.path().join("nope.toml").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");

    // the agent's variables are not the server's: this one does not stop `serve`...
    let ok_dir = dir.path().join("ok");
    fs::create_dir(&ok_dir).unwrap();
    let cfg = ok_dir.join("server.toml");
    fs::write(
        &cfg,
        format!(
            "data_dir = \"d\"\n{}[broker]\nlisten = \"127.0.0.1:{}\"\n",
            common::admin_table(),
            common::free_port()
        ),
    )
    .unwrap();
    let mut serve = Command::new(bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("FLEETBUS_AGENT__METRICS__INTERVAL", "30s")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let exited = serve.try_wait().unwrap();
    let _ = serve.kill();
    let out = serve.wait_with_output().unwrap();
    assert!(exited.is_none(), "serve exited: {}", stderr(&out));
    // ...and a misspelt server variable does, naming it
    let out = Command::new(bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("FLEETBUS_SERVER__BROKER__LISEN", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lisen"), "{}", stderr(&out));
    // ...and so does one in the older unscoped form, instead of being ignored
    let out = Command::new(bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("FLEETBUS_BROKER__LISTEN", "0.0.0.0:1883")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FLEETBUS_BROKER__LISTEN is not read"),
        "{}",
        stderr(&out)
    );
}

/// `rules check` finds, before any message, a condition that could never match as meant.
#[test]
fn rules_check_finds_unknown_names_in_macros_and_type_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    fs::write(
        &rules,
        "[sinks.out]\ntype = \"stdout\"\n\
         [[rules]]\nname = \"hot\"\nfrom = [\"fleet/+/telemetry/metrics\"]\n\
         where = 'record.metrics.exists(m, m.value > 90.0 && cpu > 1)'\nto = [\"out\"]\n\
         [[rules]]\nname = \"severe\"\nfrom = [\"fleet/+/telemetry/events\"]\n\
         where = 'record.event.severity >= \"high\"'\nto = [\"out\"]\n",
    )
    .unwrap();
    let out = run(&["rules", "check", rules.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:6:9", rules.display())) && err.contains("unknown variable `cpu`"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:11:9", rules.display()))
            && err.contains("is a number and `\"high\"` a string"),
        "{err}"
    );
}

/// The README's first command: the demo shows the product and says it worked.
#[test]
fn the_demo_shows_routing_a_verified_file_and_a_group_job() {
    let out = Command::new(bin())
        .args(["demo", "--duration", "3s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    for expected in [
        "complete, in order",
        "sha256 matches the original",
        "SUCCEEDED",
        "check.state queue  open   4",
        "--keep",
        "demo ok",
    ] {
        assert!(stdout.contains(expected), "no `{expected}` in:\n{stdout}");
    }
    assert!(!stdout.contains("NOTHING ARRIVED"), "{stdout}");
}

#[test]
fn rules_test_runs_the_files_tests_and_a_failure_exits_1_with_what_each_sink_got() {
    let dir = tempfile::tempdir().unwrap();
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rules.toml");
    // a file of tests alone, against the example's rules: one passes, one fails
    let tests = dir.path().join("more.toml");
    fs::write(
        &tests,
        r#"[[tests]]
name = "heartbeats are archived"
input = { topic = "fleet/a/telemetry/heartbeat", record = { seq = 1 } }
expect = [{ sink = "archive", count = 1 }]

[[tests]]
name = "hot cpu goes nowhere (wrong on purpose)"
input = { topic = "fleet/a/telemetry/metrics", record = { seq = 1, metrics = [{ name = "cpu.usage", value = 99.0 }] } }
expect = [{ sink = "archive", count = 1 }]
"#,
    )
    .unwrap();
    let out = run(&["rules", "test", rules, tests.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok    heartbeats are archived"), "{stdout}");
    assert!(stdout.contains("3 passed, 1 failed"), "{stdout}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "FAIL  hot cpu goes nowhere (wrong on purpose) ({}:7:8)",
            tests.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("sink `alerts`: expected nothing, got 1:"),
        "{err}"
    );
    assert!(
        err.contains("sink `console`: expected nothing, got 1:"),
        "{err}"
    );

    // a test naming a sink the rules do not have is a problem of the test file
    fs::write(
        &tests,
        "[[tests]]\nname = \"t\"\ninput = { topic = \"x\", json = \"{}\" }\nexpect = [{ sink = \"nope\" }]\n",
    )
    .unwrap();
    let out = run(&["rules", "test", rules, tests.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "{}:4:20: test `t`: unknown sink `nope`",
            tests.display()
        )),
        "{}",
        stderr(&out)
    );
}
