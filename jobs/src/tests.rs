use std::sync::Mutex;

use super::*;
use fleetbus_protocol::SignedCommand;

type Sent = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn service(dir: &Path) -> (JobService, Sent, Sent) {
    let sent: Sent = Arc::default();
    let events: Sent = Arc::default();
    let (s, e) = (sent.clone(), events.clone());
    let svc = JobService::open(
        dir,
        Some(SigningKey::from_bytes(&[3u8; 32])),
        fleetbus_support::Publisher::new(move |t, p| {
            s.lock().unwrap().push((t, p));
            Ok(())
        }),
        Arc::new(move |t, p| e.lock().unwrap().push((t, p))),
    )
    .unwrap();
    (svc, sent, events)
}

fn online(agent: &str, groups: &[&str]) -> Presence {
    let mut p = Presence::offline(agent, Utc::now());
    p.status = PresenceStatus::Online;
    p.groups = groups.iter().map(|g| g.to_string()).collect();
    p
}

fn push(svc: &mut JobService, target: JobTarget, rollout: Rollout) -> JobReport {
    svc.push(PushRequest {
        target,
        operation: "echo".into(),
        args: Default::default(),
        timeout_secs: 30,
        rollout,
        allow_empty: false,
    })
    .unwrap()
}

fn status(job: &str, state: ExecutionState) -> JobStatus {
    JobStatus {
        job_id: job.into(),
        state,
        started: Some(Utc::now()),
        finished: state.is_terminal().then(Utc::now),
        exit_code: None,
        output: String::new(),
        reason: None,
    }
}

#[test]
fn a_group_job_is_one_signed_publish_and_tracked_per_member() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, sent, events) = service(dir.path());
    for a in ["w1", "w2", "w3"] {
        svc.on_presence(&online(a, &["web"])).unwrap();
    }
    svc.on_presence(&online("db1", &["db"])).unwrap();
    let r = push(&mut svc, JobTarget::Group("web".into()), Rollout::default());
    assert_eq!(r.total(), 3);
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "one publish for the whole group");
    assert_eq!(sent[0].0, "fleet/groups/web/jobs/notify");
    let key = SigningKey::from_bytes(&[3u8; 32]).verifying_key();
    let cmd = SignedCommand::verify(&sent[0].1, &key).unwrap();
    assert_eq!(cmd.job_id(), r.job.doc.id);
    let id = r.job.doc.id.clone();
    for a in ["w1", "w2", "w3"] {
        svc.on_status(a, status(&id, ExecutionState::InProgress))
            .unwrap();
        svc.on_status(a, status(&id, ExecutionState::Succeeded))
            .unwrap();
    }
    // a late duplicate does not regress a final state
    svc.on_status("w1", status(&id, ExecutionState::InProgress))
        .unwrap();
    let r = svc.report(&id).unwrap();
    assert_eq!(r.counts.get(&ExecutionState::Succeeded), Some(&3));
    assert_eq!(r.job.state, JobState::Done);
    // events: QUEUED, IN_PROGRESS, SUCCEEDED per member
    assert_eq!(events.lock().unwrap().len(), 9);
}

#[test]
fn pending_jobs_survive_a_restart_and_reach_agents_when_they_connect() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (mut svc, _, _) = service(dir.path());
        svc.on_presence(&online("w1", &["web"])).unwrap();
        svc.on_presence(&online("w2", &["web"])).unwrap();
        push(&mut svc, JobTarget::Group("web".into()), Rollout::default())
            .job
            .doc
            .id
    };
    let (mut svc, sent, _) = service(dir.path());
    svc.on_presence(&online("w2", &["web"])).unwrap();
    // a new member of the group joins while the job is active
    svc.on_presence(&online("w9", &["web"])).unwrap();
    let sent = sent.lock().unwrap().clone();
    let topics: Vec<&str> = sent.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, vec!["fleet/w2/jobs/notify", "fleet/w9/jobs/notify"]);
    assert_eq!(svc.report(&id).unwrap().total(), 3);
}

#[test]
fn the_abort_threshold_cancels_the_targets_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, sent, _) = service(dir.path());
    let agents: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    for a in &agents {
        svc.on_presence(&online(a, &["g"])).unwrap();
    }
    let rollout = Rollout {
        max_per_minute: None,
        abort_failure_pct: Some(50.0),
        abort_min_finished: 3,
    };
    let id = push(&mut svc, JobTarget::Group("g".into()), rollout)
        .job
        .doc
        .id;
    svc.on_status("a0", status(&id, ExecutionState::Failed))
        .unwrap();
    svc.on_status("a1", status(&id, ExecutionState::Failed))
        .unwrap();
    assert_eq!(
        svc.report(&id).unwrap().job.state,
        JobState::Active,
        "minimum not reached"
    );
    svc.on_status("a2", status(&id, ExecutionState::InProgress))
        .unwrap();
    svc.on_status("a3", status(&id, ExecutionState::Succeeded))
        .unwrap();
    let r = svc.report(&id).unwrap();
    assert_eq!(r.job.state, JobState::Aborted);
    assert_eq!(r.counts.get(&ExecutionState::Canceled), Some(&6));
    assert_eq!(
        r.counts.get(&ExecutionState::InProgress),
        Some(&1),
        "running ones finish"
    );
    let last = sent.lock().unwrap().last().cloned().unwrap();
    let key = SigningKey::from_bytes(&[3u8; 32]).verifying_key();
    assert!(matches!(
        SignedCommand::verify(&last.1, &key).unwrap(),
        JobCommand::Cancel { .. }
    ));
}

#[test]
fn rollout_sends_at_most_the_rate_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, sent, _) = service(dir.path());
    for i in 0..5 {
        svc.on_presence(&online(&format!("a{i}"), &["g"])).unwrap();
    }
    let rollout = Rollout {
        max_per_minute: Some(2),
        ..Default::default()
    };
    push(&mut svc, JobTarget::Group("g".into()), rollout);
    svc.tick().unwrap();
    assert_eq!(sent.lock().unwrap().len(), 2);
    assert!(sent
        .lock()
        .unwrap()
        .iter()
        .all(|(t, _)| t.ends_with("/jobs/notify") && !t.contains("groups")));
}

#[test]
fn unknown_jobs_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, _, _) = service(dir.path());
    assert!(matches!(svc.report("nope"), Err(JobsError::NotFound(_))));
    assert!(matches!(svc.cancel("nope"), Err(JobsError::NotFound(_))));
    let bad = svc.push(PushRequest {
        target: JobTarget::Group("bad group".into()),
        operation: "echo".into(),
        args: Default::default(),
        timeout_secs: 1,
        rollout: Rollout::default(),
        allow_empty: false,
    });
    assert!(matches!(bad, Err(JobsError::Request(_))));
    // a status for a job nobody pushed changes nothing
    svc.on_status("a", status("ghost", ExecutionState::Succeeded))
        .unwrap();
}

#[test]
fn a_batch_of_reports_is_stored_together_and_settles_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, sent, _) = service(dir.path());
    let agents: Vec<String> = (0..200).map(|i| format!("a{i:03}")).collect();
    svc.batch(|svc| {
        for a in &agents {
            svc.on_presence(&online(a, &["g"])).unwrap();
        }
    })
    .unwrap();
    assert_eq!(
        svc.agents(&AgentFilter {
            group: Some("g".into()),
            ..AgentFilter::default()
        })
        .unwrap()
        .len(),
        200
    );
    assert!(svc
        .agents(&AgentFilter {
            group: Some("other".into()),
            ..AgentFilter::default()
        })
        .unwrap()
        .is_empty());
    let id = push(&mut svc, JobTarget::Group("g".into()), Rollout::default())
        .job
        .doc
        .id;
    // every report in one batch: the job is done at the end of it, on disk
    svc.batch(|svc| {
        for a in &agents {
            svc.on_status(a, status(&id, ExecutionState::InProgress))
                .unwrap();
            svc.on_status(a, status(&id, ExecutionState::Succeeded))
                .unwrap();
        }
    })
    .unwrap();
    drop(svc);
    let (svc, _, _) = service(dir.path());
    let r = svc.summary(&id).unwrap();
    assert_eq!(r.counts.get(&ExecutionState::Succeeded), Some(&200));
    assert_eq!(r.job.state, JobState::Done);
    assert!(r.executions.is_empty(), "a summary has counts only");
    assert_eq!(sent.lock().unwrap().len(), 1);

    // the abort threshold is checked at the end of a batch too
    let (mut svc, sent, _) = service(dir.path());
    let rollout = Rollout {
        max_per_minute: None,
        abort_failure_pct: Some(10.0),
        abort_min_finished: 5,
    };
    let id = push(&mut svc, JobTarget::Group("g".into()), rollout)
        .job
        .doc
        .id;
    svc.batch(|svc| {
        for a in &agents[..10] {
            svc.on_status(a, status(&id, ExecutionState::Failed))
                .unwrap();
        }
    })
    .unwrap();
    let r = svc.summary(&id).unwrap();
    assert_eq!(r.job.state, JobState::Aborted);
    assert_eq!(r.counts.get(&ExecutionState::Failed), Some(&10));
    assert_eq!(r.counts.get(&ExecutionState::Canceled), Some(&190));
    assert_eq!(sent.lock().unwrap().len(), 2, "the job, then one cancel");
}

fn push_req(target: JobTarget, allow_empty: bool) -> PushRequest {
    PushRequest {
        target,
        operation: "echo".into(),
        args: Default::default(),
        timeout_secs: 30,
        rollout: Rollout::default(),
        allow_empty,
    }
}

#[test]
fn a_push_with_no_known_target_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, sent, _) = service(dir.path());
    svc.on_presence(&online("w1", &["web"])).unwrap();
    let err = svc
        .push(push_req(JobTarget::Group("nosuch".into()), false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("group `nosuch` has no known member"), "{err}");
    let err = svc
        .push(push_req(JobTarget::Agent("nobody-here".into()), false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no agent `nobody-here` is known"), "{err}");
    assert!(sent.lock().unwrap().is_empty(), "nothing published");
    assert!(svc.list(10).unwrap().is_empty(), "nothing stored");
    // allowed: queued, and a member that connects later gets it
    let r = svc
        .push(push_req(JobTarget::Group("nosuch".into()), true))
        .unwrap();
    assert_eq!(r.total(), 0);
    svc.on_presence(&online("late", &["nosuch"])).unwrap();
    let r = svc.report(&r.job.doc.id).unwrap();
    assert_eq!(r.total(), 1);
    assert_eq!(r.executions[0].agent, "late");
}

#[test]
fn executions_queued_past_the_offline_expiry_end_and_so_does_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, _, events) = service(dir.path());
    let mut svc = svc.with_offline_expiry(Duration::from_millis(300));
    svc.on_presence(&online("w1", &["web"])).unwrap();
    svc.on_presence(&online("w2", &["web"])).unwrap();
    let id = push(&mut svc, JobTarget::Group("web".into()), Rollout::default())
        .job
        .doc
        .id;
    svc.on_status("w1", status(&id, ExecutionState::InProgress))
        .unwrap();
    svc.on_status("w1", status(&id, ExecutionState::Succeeded))
        .unwrap();
    // an empty job allowed in: ends at the expiry too
    let empty = svc
        .push(push_req(JobTarget::Group("nobody".into()), true))
        .unwrap()
        .job
        .doc
        .id;
    svc.tick().unwrap();
    assert_eq!(svc.summary(&id).unwrap().job.state, JobState::Active);
    std::thread::sleep(Duration::from_millis(400));
    svc.tick().unwrap();
    let r = svc.report(&id).unwrap();
    assert_eq!(r.job.state, JobState::Done);
    let w2 = r.executions.iter().find(|e| e.agent == "w2").unwrap();
    assert_eq!(w2.state, ExecutionState::TimedOut);
    assert!(
        w2.reason
            .as_deref()
            .unwrap_or("")
            .contains("offline expiry"),
        "{w2:?}"
    );
    assert_eq!(r.counts.get(&ExecutionState::Succeeded), Some(&1));
    assert_eq!(svc.summary(&empty).unwrap().job.state, JobState::Done);
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|(_, p)| String::from_utf8_lossy(p).contains("TIMED_OUT")));
}

#[test]
fn a_forgotten_agent_leaves_the_registry_and_the_jobs_it_never_started() {
    let dir = tempfile::tempdir().unwrap();
    let (mut svc, _, _) = service(dir.path());
    svc.on_presence(&online("w1", &["web"])).unwrap();
    svc.on_presence(&online("ghost", &["web"])).unwrap();
    let id = push(&mut svc, JobTarget::Group("web".into()), Rollout::default())
        .job
        .doc
        .id;
    svc.on_status("w1", status(&id, ExecutionState::InProgress))
        .unwrap();
    svc.on_status("w1", status(&id, ExecutionState::Succeeded))
        .unwrap();
    assert_eq!(svc.summary(&id).unwrap().job.state, JobState::Active);
    let f = svc.forget("ghost").unwrap();
    assert_eq!(f.removed_from, vec![id.clone()]);
    let r = svc.report(&id).unwrap();
    assert_eq!(r.job.state, JobState::Done, "{r:?}");
    assert_eq!(r.total(), 1);
    let known: Vec<String> = svc
        .agents(&AgentFilter::default())
        .unwrap()
        .into_iter()
        .map(|a| a.agent)
        .collect();
    assert_eq!(known, vec!["w1".to_string()]);
    assert!(matches!(svc.forget("ghost"), Err(JobsError::NoAgent(_))));
    // the next group job does not target it
    let r = push(&mut svc, JobTarget::Group("web".into()), Rollout::default());
    assert_eq!(r.total(), 1);
}

#[test]
fn without_a_signing_key_the_registry_works_and_jobs_are_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = JobService::open(
        dir.path(),
        None,
        fleetbus_support::Publisher::discard(),
        Arc::new(|_, _| {}),
    )
    .unwrap();
    svc.on_presence(&online("w1", &["web"])).unwrap();
    assert_eq!(
        svc.agents(&AgentFilter {
            group: Some("web".into()),
            ..AgentFilter::default()
        })
        .unwrap()
        .len(),
        1
    );
    assert!(matches!(
        svc.push(push_req(JobTarget::Group("web".into()), false)),
        Err(JobsError::Off)
    ));
    svc.tick().unwrap();
    svc.forget("w1").unwrap();
    assert!(svc.agents(&AgentFilter::default()).unwrap().is_empty());
}

#[test]
fn agents_an_older_ledger_kept_move_to_the_registry_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = rusqlite::Connection::open(dir.path().join("jobs.sqlite")).unwrap();
        db.execute_batch(
            "CREATE TABLE agents (agent TEXT PRIMARY KEY, groups TEXT NOT NULL,
                 online INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL);
             INSERT INTO agents VALUES ('old-1', '[\"web\"]', 0, 1700000000000);",
        )
        .unwrap();
    }
    let (svc, _, _) = service(dir.path());
    let known = svc
        .agents(&AgentFilter {
            group: Some("web".into()),
            ..AgentFilter::default()
        })
        .unwrap();
    assert_eq!(known.len(), 1);
    assert_eq!(known[0].agent, "old-1");
    drop(svc);
    let db = rusqlite::Connection::open(dir.path().join("jobs.sqlite")).unwrap();
    let left: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'agents'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "the old table is gone");
}
