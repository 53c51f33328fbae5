//! The lean agent binary: what it is built from, and that it is the agent.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// What a machine of the fleet must not carry (the server's parts, its databases, the
/// benchmarks' stores).
const SERVER_ONLY: &[&str] = &[
    "fleetbus-broker",
    "fleetbus-server",
    "fleetbus-pipeline",
    "fleetbus-rules",
    "fleetbus-sinks",
    "fleetbus-jobs",
    "fleetbus-console",
    "fleetbus-wal",
    "fleetbus-testkit",
    "rumqttd",
    "rusqlite",
    "aws-sdk-s3",
    "redb",
    "fjall",
    "axum",
    "cel",
];

/// Every package `root` depends on, by the workspace's lock file (the union over all
/// features, so this errs on the side of finding too much).
fn dependencies_of(root: &str) -> BTreeSet<String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("the workspace's Cargo.lock");
    let lock: toml::Table = toml::from_str(&lock).expect("Cargo.lock is TOML");
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    for package in lock["package"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("name").to_string();
        let of: Vec<String> = package
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|d| {
                d.iter()
                    .filter_map(|v| v.as_str())
                    // "name version" when several versions are locked
                    .map(|v| v.split(' ').next().unwrap_or(v).to_string())
                    .collect()
            })
            .unwrap_or_default();
        deps.entry(name).or_default().extend(of);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(next) = todo.pop() {
        for dep in deps.get(&next).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn the_agent_binary_carries_no_part_of_the_server() {
    let deps = dependencies_of("fleetbus-agent-cli");
    assert!(deps.contains("fleetbus-agent"), "{deps:?}");
    let found: Vec<&&str> = SERVER_ONLY.iter().filter(|c| deps.contains(**c)).collect();
    assert!(found.is_empty(), "the agent binary depends on {found:?}");
    // and the check can see what the full binary carries
    assert!(dependencies_of("fleetbus").contains("fleetbus-broker"));
}

#[test]
fn the_agent_binary_runs_the_agent_and_reports_a_bad_configuration_in_place() {
    let bin = env!("CARGO_BIN_EXE_fleetbus-agent");
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run fleetbus-agent");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for command in ["upload", "reset-identity", "--config"] {
        assert!(text.contains(command), "no `{command}` in:\n{text}");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[metrics]\ninterval = \"10ms\"\n").expect("write config");
    let out = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run fleetbus-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}:2:1: metrics.interval: must be at least 100ms",
            config.display()
        )),
        "{err}"
    );
}
