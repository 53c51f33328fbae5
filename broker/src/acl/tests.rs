use rand::{Rng, SeedableRng};

use super::*;

fn agent(id: &str, groups: &[&str]) -> Identity {
    Identity {
        client_id: id.into(),
        role: Role::Agent,
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

#[test]
fn the_default_policy_keeps_agents_in_their_own_topics() {
    let policy = Policy::default();
    policy.validate().unwrap();
    let web01 = agent("web-01", &["web", "eu"]);
    let server = Identity {
        client_id: "fleetbus-engine".into(),
        role: Role::Server,
        groups: vec![],
    };
    let cases: &[(&Identity, Action, &str, bool)] = &[
        (
            &web01,
            Action::Publish,
            "fleet/web-01/telemetry/metrics",
            true,
        ),
        (&web01, Action::Publish, "fleet/web-01/presence", true),
        (&web01, Action::Publish, "fleet/web-01/files/f1/chunk", true),
        (
            &web01,
            Action::Publish,
            "fleet/web-02/telemetry/metrics",
            false,
        ),
        (
            &web01,
            Action::Publish,
            "fleet/groups/web/jobs/notify",
            false,
        ),
        (&web01, Action::Publish, "fleet/web-01/jobs/status", true),
        // what only the server produces, even under the agent's own id
        (&web01, Action::Publish, "fleet/web-01", false),
        (&web01, Action::Publish, "fleet/web-01/acks", false),
        (&web01, Action::Publish, "fleet/web-01/replies/files", false),
        (&web01, Action::Publish, "fleet/web-01/jobs/notify", false),
        (&web01, Action::Publish, "fleet/web-01/jobs/event", false),
        (&web01, Action::Publish, "fleet/web-01/files/f1/chunk", true),
        (
            &web01,
            Action::Publish,
            "fleet/web-01/files/f1/complete",
            false,
        ),
        (&web01, Action::Publish, "fleet/web-01/telemetry/a/b", false),
        (&web01, Action::Publish, "$SYS/x", false),
        (&web01, Action::Subscribe, "fleet/web-01/acks", true),
        (
            &web01,
            Action::Subscribe,
            "fleet/web-01/replies/files",
            true,
        ),
        (&web01, Action::Subscribe, "fleet/web-01/jobs/notify", true),
        (
            &web01,
            Action::Subscribe,
            "fleet/groups/web/jobs/notify",
            true,
        ),
        (
            &web01,
            Action::Subscribe,
            "fleet/groups/eu/jobs/notify",
            true,
        ),
        (
            &web01,
            Action::Subscribe,
            "fleet/groups/db/jobs/notify",
            false,
        ),
        (
            &web01,
            Action::Subscribe,
            "fleet/groups/+/jobs/notify",
            false,
        ),
        (&web01, Action::Subscribe, "fleet/#", false),
        (&web01, Action::Subscribe, "#", false),
        (&web01, Action::Subscribe, "fleet/+/acks", false),
        (&web01, Action::Subscribe, "fleet/web-01/#", false),
        (&web01, Action::Subscribe, "fleet/web-02/jobs/notify", false),
        (&server, Action::Subscribe, "fleet/+/telemetry/#", true),
        (
            &server,
            Action::Publish,
            "fleet/groups/web/jobs/notify",
            true,
        ),
        (&server, Action::Subscribe, "$SYS/#", false),
    ];
    for (who, action, topic, allowed) in cases {
        let d = policy.check(who, *action, topic);
        assert_eq!(
            d.allowed, *allowed,
            "{} {action:?} {topic}: {d:?}",
            who.client_id
        );
        if d.allowed {
            assert!(d.rule.is_some(), "{d:?}");
        }
    }
    let why = policy.check(&web01, Action::Publish, "fleet/web-02/telemetry/x");
    assert!(why.reason.contains("no rule allows"), "{why:?}");
    let ok = policy.check(&web01, Action::Publish, "fleet/web-01/telemetry/x");
    assert_eq!(ok.rule.as_deref(), Some("agent-publishes-own-topics"));
    assert_eq!(ok.reason, "matches `fleet/web-01/telemetry/+`");
}

#[test]
fn odd_ids_and_groups_never_widen_a_pattern() {
    let policy = Policy::default();
    for id in ["+", "#", "a/b", "", "groups", "enroll", "$SYS"] {
        let who = agent(id, &["+", "#", "web/x", ""]);
        for topic in [
            "fleet/x/telemetry/a",
            "fleet/groups/web/jobs/notify",
            "fleet/a/b/telemetry",
        ] {
            assert!(
                !policy.check(&who, Action::Publish, topic).allowed,
                "`{id}` may publish on {topic}"
            );
        }
        assert!(
            !policy
                .check(&who, Action::Subscribe, "fleet/groups/+/jobs/notify")
                .allowed
        );
    }
    // wildcards in a published topic are refused before any rule is looked at
    let d = policy.check(&agent("a", &[]), Action::Publish, "fleet/a/#");
    assert!(!d.allowed && d.reason.contains("wildcards"), "{d:?}");
}

#[test]
fn covers_is_filter_inclusion() {
    for (pattern, filter, want) in [
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("a/#", "a/+/c", true),
        ("a/#", "a/#", true),
        ("a/+", "a/b", true),
        ("a/+", "a/+", true),
        ("a/+", "a/#", false),
        ("a/+", "a", false),
        ("a/+", "a/b/c", false),
        ("a/b", "a/+", false),
        ("a/b", "a/b", true),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
    ] {
        assert_eq!(covers(pattern, filter), want, "{pattern} covers {filter}");
    }
}

#[test]
fn policy_files_are_checked() {
    let p = Policy::from_toml(
        r#"
        [[rule]]
        name = "mine"
        role = "agent"
        actions = ["publish"]
        topics = ["site/${client_id}/#"]
        "#,
    )
    .unwrap();
    assert!(
        p.check(&agent("a", &[]), Action::Publish, "site/a/x")
            .allowed
    );
    for (bad, says) in [
        ("site/${client}/x", "placeholders"),
        ("site/a${client_id}/x", "placeholders"),
        ("site/#/x", "last level"),
        ("site/a+/x", "whole level"),
    ] {
        let text = format!(
            "[[rule]]\nname = \"r\"\nrole = \"agent\"\nactions = [\"publish\"]\ntopics = [\"{bad}\"]\n"
        );
        let err = Policy::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains(says) && err.contains("rule `r`"),
            "{bad}: {err}"
        );
    }
    assert!(Policy::from_toml(
        "[[rule]]\nname = \"r\"\nrole = \"root\"\nactions = []\ntopics = []\n"
    )
    .is_err());
}

/// Random filters and topics: whatever the default policy allows an agent covers only
/// topics under its own prefix or its groups' job topics.
#[test]
fn no_allowed_filter_reaches_a_forbidden_topic() {
    let policy = Policy::default();
    let levels = [
        "fleet",
        "groups",
        "web",
        "db",
        "a",
        "b",
        "+",
        "#",
        "jobs",
        "notify",
        "acks",
        "replies",
        "files",
        "telemetry",
        "presence",
        "status",
        "$SYS",
        "",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let who = agent("a", &["web"]);
    let mut allowed = 0;
    for _ in 0..200_000 {
        let n = rng.random_range(1..=5);
        let mut filter: Vec<&str> = (0..n)
            .map(|_| levels[rng.random_range(0..levels.len())])
            .collect();
        // half of them start near the agent's own topics, where allowed cases are
        if rng.random_bool(0.5) {
            filter.splice(
                0..0,
                ["fleet", ["a", "groups", "+"][rng.random_range(0..3)]],
            );
        }
        let filter = filter.join("/");
        for action in [Action::Publish, Action::Subscribe] {
            if !policy.check(&who, action, &filter).allowed {
                continue;
            }
            allowed += 1;
            let own = covers("fleet/a/#", &filter);
            let group = covers("fleet/groups/web/jobs/notify", &filter);
            assert!(own || group, "{action:?} {filter} allowed");
            if action == Action::Publish {
                assert!(own, "publish {filter} allowed");
            }
        }
    }
    assert!(allowed > 100, "the generator reached too few allowed cases");
}
