use super::*;
use fleetbus_protocol::{Resource, Severity};

fn event(class: &str, rule: &str, severity: Severity, clear: bool) -> Event {
    Event {
        class: class.into(),
        severity,
        rule: Some(rule.into()),
        group: None,
        resources: vec![Resource {
            kind: "mount".into(),
            name: "/".into(),
        }],
        text: format!("{class} from {rule}"),
        clear,
    }
}

fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

fn incoming(agent: &str, ts: DateTime<Utc>, event: Event) -> Incoming {
    Incoming {
        agent: agent.into(),
        ts,
        event,
        tags: BTreeMap::from([("cloud".into(), "aws".into())]),
        groups: vec![format!("{agent}-group"), "web".into()],
    }
}

fn console() -> (tempfile::TempDir, Console) {
    let dir = tempfile::tempdir().unwrap();
    let c = Console::open(&dir.path().join("console.sqlite")).unwrap();
    (dir, c)
}

/// The issue's case: the same event from 3 agents, 50 times each, is 3 rows of 50 with
/// the first and last times; a batch folded again (a replay after a crash) adds nothing.
#[test]
fn three_agents_times_fifty_repeats_fold_into_three_rows_of_fifty() {
    let (_dir, mut c) = console();
    let mut batch = Vec::new();
    let mut index = 0;
    for repeat in 0..50 {
        for agent in ["a1", "a2", "a3"] {
            let e = event("disk.full", "check_disk", Severity::MAJOR, false);
            batch.push((index, incoming(agent, at(repeat), e)));
            index += 1;
        }
    }
    let (first, second) = batch.split_at(70);
    c.fold("console", first, 70).unwrap();
    c.fold("console", second, 150).unwrap();
    // the whole of it again: every index is below the saved position
    c.fold("console", &batch, 150).unwrap();
    assert_eq!(c.position("console").unwrap(), 150);
    let rows = c.list(&Filter::default()).unwrap();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for row in &rows {
        assert_eq!(row.count, 50, "{row:?}");
        assert_eq!((row.first, row.last), (at(0), at(49)));
        assert_eq!(row.state, RowState::Open);
        assert_eq!(row.tags["cloud"], "aws");
        assert_eq!(row.resources[0].name, "/");
    }
}

#[test]
fn a_clearing_event_closes_its_row_only_and_the_next_problem_opens_a_new_one() {
    let (_dir, mut c) = console();
    let down = event("check.state", "http", Severity::MAJOR, false);
    let other = event("check.state", "disk", Severity::WARNING, false);
    let up = event("check.state", "http", Severity::INFO, true);
    c.fold(
        "console",
        &[
            (0, incoming("a1", at(0), down.clone())),
            (1, incoming("a1", at(1), other)),
            (2, incoming("a1", at(2), up)),
            (3, incoming("a1", at(3), down)),
        ],
        4,
    )
    .unwrap();
    let rows = c.list(&Filter::default()).unwrap();
    let summary: Vec<(&str, RowState, u64)> = rows
        .iter()
        .map(|r| (r.rule.as_deref().unwrap(), r.state, r.count))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("http", RowState::Open, 1),
            ("http", RowState::Closed, 1),
            ("disk", RowState::Open, 1)
        ]
    );
    assert_eq!(rows[1].changed_by.as_deref(), Some("recovery"));
    assert_eq!(rows[1].closed, Some(at(2)));
    let open = c
        .list(&Filter {
            open: true,
            min_severity: Some(4),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(open.len(), 1);
}

#[test]
fn acknowledge_close_and_their_refusals() {
    let (_dir, mut c) = console();
    let e = event("disk.full", "check_disk", Severity::MAJOR, false);
    c.fold("console", &[(0, incoming("a1", at(0), e.clone()))], 1)
        .unwrap();
    let id = c.list(&Filter::default()).unwrap()[0].id;
    let acked = c.acknowledge(id, "on it", "ops").unwrap();
    assert_eq!(acked.state, RowState::Acknowledged);
    assert_eq!(
        (acked.comment.as_deref(), acked.changed_by.as_deref()),
        (Some("on it"), Some("ops"))
    );
    // an acknowledged row still folds its repeats
    c.fold("console", &[(1, incoming("a1", at(5), e))], 2)
        .unwrap();
    let row = c.get(id).unwrap();
    assert_eq!((row.state, row.count), (RowState::Acknowledged, 2));
    let closed = c.close(id, "fixed", "ops").unwrap();
    assert_eq!(closed.state, RowState::Closed);
    assert!(closed.closed.is_some());
    assert!(matches!(
        c.close(id, "", "ops"),
        Err(ConsoleError::Request(_))
    ));
    assert!(matches!(
        c.acknowledge(999, "", "ops"),
        Err(ConsoleError::NotFound(999))
    ));
}

#[test]
fn a_silence_marks_what_it_covers_until_it_expires_and_nothing_is_lost() {
    let (_dir, mut c) = console();
    let now = Utc::now();
    c.fold(
        "console",
        &[(
            0,
            incoming(
                "a1",
                now,
                event("disk.full", "check_disk", Severity::MAJOR, false),
            ),
        )],
        1,
    )
    .unwrap();
    let s = c
        .silence(
            &Silence {
                agent: None,
                rule: None,
                group: Some("a1-group".into()),
                duration: Duration::from_secs(7200),
                comment: "maintenance".into(),
            },
            "ops",
        )
        .unwrap();
    // the open row it covers, and new events of the group, are marked, not dropped
    c.fold(
        "console",
        &[
            (
                1,
                incoming(
                    "a1",
                    now,
                    event("load.high", "check_load", Severity::WARNING, false),
                ),
            ),
            (
                2,
                incoming(
                    "a2",
                    now,
                    event("load.high", "check_load", Severity::WARNING, false),
                ),
            ),
        ],
        3,
    )
    .unwrap();
    let visible = c.list(&Filter::default()).unwrap();
    assert_eq!(visible.len(), 1);
    assert_eq!(visible[0].agent, "a2");
    let all = c
        .list(&Filter {
            silenced: true,
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(all.len(), 3);
    assert!(all
        .iter()
        .filter(|r| r.agent == "a1")
        .all(|r| r.silenced_by == Some(s.id)));
    assert_eq!(c.silences(now).unwrap().len(), 1);
    assert!(c
        .silences(now + chrono::Duration::hours(3))
        .unwrap()
        .is_empty());
    // after it expires, a new event of the group is not silenced
    let later = now + chrono::Duration::hours(3);
    c.fold(
        "console",
        &[(
            3,
            incoming(
                "a1",
                later,
                event("disk.full", "check_disk", Severity::MAJOR, false),
            ),
        )],
        4,
    )
    .unwrap();
    let disk = c
        .list(&Filter {
            agent: Some("a1".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(disk.len(), 1);
    assert_eq!(disk[0].count, 2);
    let nothing = Silence {
        agent: None,
        rule: None,
        group: None,
        duration: Duration::from_secs(1),
        comment: String::new(),
    };
    assert!(matches!(
        c.silence(&nothing, "ops"),
        Err(ConsoleError::Request(_))
    ));
}

#[test]
fn closed_rows_go_after_their_retention() {
    let (_dir, mut c) = console();
    c.fold(
        "console",
        &[
            (
                0,
                incoming("a1", at(0), event("x", "r", Severity::MAJOR, false)),
            ),
            (
                1,
                incoming("a1", at(1), event("x", "r", Severity::INFO, true)),
            ),
            (
                2,
                incoming("a1", at(2), event("y", "r", Severity::MAJOR, false)),
            ),
        ],
        3,
    )
    .unwrap();
    assert_eq!(c.purge(at(1)).unwrap(), 0, "closed at 1: not before 1");
    assert_eq!(c.purge(at(10)).unwrap(), 1);
    let rows = c.list(&Filter::default()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].class, "y");
}

/// One agent raising endless distinct events: it gets its limit of rows, then one overflow
/// row counts the rest; other agents are not affected, and repeats of its open rows still
/// fold into them.
#[test]
fn an_agent_past_its_open_row_limit_folds_into_one_overflow_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Console::open(&dir.path().join("c.sqlite"))
        .unwrap()
        .with_limit(3);
    let mut batch = Vec::new();
    for n in 0..10u64 {
        let e = event(&format!("class-{n}"), "r", Severity::MAJOR, false);
        batch.push((n, incoming("noisy", at(n as i64), e)));
    }
    batch.push((
        10,
        incoming(
            "noisy",
            at(20),
            event("class-0", "r", Severity::MAJOR, false),
        ),
    ));
    batch.push((
        11,
        incoming(
            "quiet",
            at(21),
            event("class-9", "r", Severity::MAJOR, false),
        ),
    ));
    c.fold("console", &batch, 12).unwrap();
    let noisy = c
        .list(&Filter {
            agent: Some("noisy".into()),
            ..Filter::default()
        })
        .unwrap();
    let mut summary: Vec<(String, u64)> =
        noisy.iter().map(|r| (r.class.clone(), r.count)).collect();
    summary.sort();
    assert_eq!(
        summary,
        vec![
            ("class-0".to_string(), 2),
            ("class-1".to_string(), 1),
            ("class-2".to_string(), 1),
            (OVERFLOW_CLASS.to_string(), 7)
        ]
    );
    let overflow = noisy.iter().find(|r| r.class == OVERFLOW_CLASS).unwrap();
    assert!(
        overflow.text.contains("the latest: class-9 r"),
        "{}",
        overflow.text
    );
    let quiet = Filter {
        agent: Some("quiet".into()),
        ..Filter::default()
    };
    assert_eq!(c.list(&quiet).unwrap().len(), 1);
}
