//! The event console's two stores, SQLite and PostgreSQL (a real server from Debian's
//! package, in a temp dir), through the one handle the `console` sink and the admin
//! endpoint use: the same events fold into the same rows in both.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use fleetbus_console::{
    CheckUpdate, ConsoleError, Filter, Incoming, RowState, Silence, OVERFLOW_CLASS,
};
use fleetbus_protocol::{Event, Resource, Severity};
use fleetbus_sinks::console::{ConsoleLocation, Store};
use fleetbus_testkit::postgres::{Postgres, PG_PASSWORD};

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

fn incoming(agent: &str, s: i64, event: Event) -> Incoming {
    Incoming {
        agent: agent.into(),
        ts: Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap(),
        event,
        tags: BTreeMap::from([("cloud".into(), "gcp".into())]),
        groups: vec![format!("{agent}-rack")],
    }
}

/// What both stores must do alike.
async fn behaves(store: Store) {
    // 3 agents × 50 repeats, in two batches, then all of it again (a replay)
    let mut batch = Vec::new();
    for n in 0..150u64 {
        let agent = ["a1", "a2", "a3"][(n % 3) as usize];
        batch.push((
            n,
            incoming(
                agent,
                (n / 3) as i64,
                event("disk.full", "disk", Severity::MAJOR, false),
            ),
        ));
    }
    store
        .fold("console", batch[..70].to_vec(), vec![], 70)
        .await
        .unwrap();
    store
        .fold("console", batch[70..].to_vec(), vec![], 150)
        .await
        .unwrap();
    store
        .fold("console", batch.clone(), vec![], 150)
        .await
        .unwrap();
    assert_eq!(store.position("console").await.unwrap(), 150);
    let rows = store.list(Filter::default()).await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for r in &rows {
        assert_eq!((r.count, r.state), (50, RowState::Open));
        assert_eq!(r.first, Utc.timestamp_opt(1_800_000_000, 0).unwrap());
        assert_eq!(r.last, Utc.timestamp_opt(1_800_000_049, 0).unwrap());
        assert_eq!(r.tags["cloud"], "gcp");
        assert_eq!(r.resources[0].name, "/");
    }
    // a recovery closes a1's row; ack and close by an operator; a closed row stays closed
    store
        .fold(
            "console",
            vec![(
                150,
                incoming("a1", 60, event("disk.full", "disk", Severity::INFO, true)),
            )],
            vec![],
            151,
        )
        .await
        .unwrap();
    let by = |agent: &str| rows.iter().find(|r| r.agent == agent).unwrap().id;
    assert_eq!(store.get(by("a1")).await.unwrap().state, RowState::Closed);
    let acked = store
        .change(
            by("a2"),
            RowState::Acknowledged,
            "on it".into(),
            "ops".into(),
        )
        .await
        .unwrap();
    assert_eq!(
        (acked.state, acked.comment.as_deref()),
        (RowState::Acknowledged, Some("on it"))
    );
    let again = store
        .change(by("a1"), RowState::Closed, String::new(), "ops".into())
        .await;
    assert!(matches!(again, Err(ConsoleError::Request(_))), "{again:?}");
    assert!(matches!(
        store.get(999_999).await,
        Err(ConsoleError::NotFound(_))
    ));
    // a silence by group marks a3's open row and its next events
    let s = store
        .silence(
            Silence {
                agent: None,
                rule: None,
                group: Some("a3-rack".into()),
                duration: Duration::from_secs(3600),
                comment: "moving".into(),
            },
            "ops".into(),
        )
        .await
        .unwrap();
    let visible = store
        .list(Filter {
            open: true,
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        visible.iter().map(|r| r.agent.as_str()).collect::<Vec<_>>(),
        ["a2"]
    );
    let group = Filter {
        group: Some("a3-rack".into()),
        silenced: true,
        ..Filter::default()
    };
    let a3 = store.list(group).await.unwrap();
    assert_eq!((a3.len(), a3[0].silenced_by), (1, Some(s.id)));
    assert_eq!(store.silences(Utc::now()).await.unwrap().len(), 1);
    // the per-agent bound: a noisy agent gets 3 rows, then its overflow row
    let mut noisy = Vec::new();
    for n in 0..6u64 {
        noisy.push((
            151 + n,
            incoming(
                "noisy",
                70,
                event(&format!("c{n}"), "r", Severity::MAJOR, false),
            ),
        ));
    }
    store.fold("console", noisy, vec![], 157).await.unwrap();
    let only = Filter {
        agent: Some("noisy".into()),
        ..Filter::default()
    };
    let mut classes: Vec<(String, u64)> = store
        .list(only)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.class, r.count))
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        vec![
            ("c0".into(), 1),
            ("c1".into(), 1),
            ("c2".into(), 1),
            (OVERFLOW_CLASS.into(), 3)
        ]
    );
    // checks: the latest result of each is kept (an older one changes nothing), at most
    // 3 checks per agent
    let check = |name: &str, s: i64, status: u8| CheckUpdate {
        agent: "a2".into(),
        ts: Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap(),
        name: name.into(),
        status,
        state_type: "hard".into(),
        output: format!("{name} at {s}"),
    };
    let results = vec![
        (157, check("disk", 10, 2)),
        (158, check("disk", 20, 0)),
        (159, check("disk", 15, 1)),
        (160, check("load", 10, 0)),
        (161, check("mem", 10, 0)),
        (162, check("swap", 10, 0)),
    ];
    store.fold("console", vec![], results, 163).await.unwrap();
    let kept: Vec<(String, u8, String)> = store
        .checks("a2")
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.status, c.output))
        .collect();
    assert_eq!(
        kept,
        vec![
            ("disk".into(), 0, "disk at 20".into()),
            ("load".into(), 0, "load at 10".into()),
            ("mem".into(), 0, "mem at 10".into())
        ]
    );
    // retention: the closed row goes
    assert_eq!(
        store
            .purge(Utc::now() + chrono::Duration::days(400))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_console_folds_acks_silences_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    behaves(ConsoleLocation::default().store(dir.path(), 3).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_console_does_the_same() {
    let Some(pg) = Postgres::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg-password");
    std::fs::write(&pw, format!("{PG_PASSWORD}\n")).unwrap();
    let location: ConsoleLocation = toml::from_str(&format!(
        "url = \"{}\"\npassword = {{ file = \"{}\" }}\ntimeout = \"5s\"\n",
        pg.url(),
        pw.display()
    ))
    .unwrap();
    behaves(location.store(dir.path(), 3).unwrap()).await;
    // the rows are in PostgreSQL
    let client = pg.client().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM console_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 6,
        "a2, a3, the noisy agent's 3 rows and its overflow row"
    );
}
