//! `fleetbus acl check`: the decision, the rule that made it, and the exit code.

use std::process::Command;

fn acl(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetbus"))
        .arg("acl")
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn acl_check_explains_allow_and_deny() {
    let (ok, out) = acl(&[
        "--client",
        "web-01",
        "--publish",
        "fleet/web-02/telemetry/metrics",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.starts_with("deny: no rule allows web-01 (agent)"),
        "{out}"
    );

    let (ok, out) = acl(&[
        "--client",
        "web-01",
        "--groups",
        "web,eu",
        "--subscribe",
        "fleet/groups/eu/jobs/notify",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("rule `agent-subscribes-own-replies-and-jobs`"),
        "{out}"
    );

    let (ok, out) = acl(&["--client", "web-01", "--subscribe", "fleet/#"]);
    assert!(!ok, "{out}");

    // a policy file replaces the built-in one; a broken one is an error naming the rule
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "[[rule]]\nname = \"site\"\nrole = \"agent\"\nactions = [\"publish\"]\ntopics = [\"site/${client_id}/#\"]\n",
    )
    .unwrap();
    let policy = file.to_str().unwrap();
    let (ok, out) = acl(&["--client", "a", "--publish", "site/a/x", "--policy", policy]);
    assert!(ok && out.contains("rule `site`"), "{out}");
    std::fs::write(
        &file,
        "[[rule]]\nname = \"bad\"\nrole = \"agent\"\nactions = [\"publish\"]\ntopics = [\"site/#/x\"]\n",
    )
    .unwrap();
    let (ok, out) = acl(&["--client", "a", "--publish", "site/a/x", "--policy", policy]);
    assert!(
        !ok && out.contains("rule `bad`") && out.contains("policy.toml"),
        "{out}"
    );
}
