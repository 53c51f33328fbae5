use std::time::Duration;

use super::*;
use crate::config::OutboxConfig;

struct Running {
    runner: CheckRunner,
    outbox: Arc<Outbox>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(dir: &std::path::Path, checks: &[(&str, CheckConfig)], concurrency: usize) -> Running {
    let outbox =
        Arc::new(Outbox::open(&dir.join("outbox"), "a1", &OutboxConfig::default()).unwrap());
    let checks: BTreeMap<String, CheckConfig> = checks
        .iter()
        .map(|(n, c)| (n.to_string(), c.clone()))
        .collect();
    let config = CheckRunnerConfig {
        concurrency,
        kill_grace: Duration::from_millis(200),
        submit_poll: Duration::from_millis(50),
    };
    let runner = CheckRunner::open("a1", &checks, &config, dir).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(runner.clone().run(outbox.clone(), rx));
    Running {
        runner,
        outbox,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) -> Vec<Record> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
        self.outbox.commit().unwrap();
        self.outbox
            .read_from(0, 10_000)
            .unwrap()
            .iter()
            .map(|i| Record::decode(&i.payload).unwrap())
            .collect()
    }
}

fn sh(script: &str) -> CheckConfig {
    CheckConfig::new(&["sh", "-c", script], Duration::from_secs(1))
}

/// A run that takes 2.5 intervals: the turns it takes are skipped and counted, and no two
/// runs of the check ever overlap.
#[tokio::test]
async fn a_run_longer_than_the_interval_skips_turns_and_never_overlaps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let script = format!(
        "echo start >> {0}; sleep 2.5; echo end >> {0}; echo OK",
        log.display()
    );
    let running = start(dir.path(), &[("slow", sh(&script))], 4);
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let counts = running.runner.counts();
    running.stop().await;
    assert!(counts.runs >= 2, "{counts:?}");
    assert!(counts.skipped >= 2 * (counts.runs - 1), "{counts:?}");
    let lines = std::fs::read_to_string(&log).unwrap();
    for pair in lines.lines().collect::<Vec<_>>().chunks(2) {
        assert_eq!(pair[0], "start", "{lines}");
        if pair.len() == 2 {
            assert_eq!(pair[1], "end", "{lines}");
        }
    }
}

/// With one slot, two checks never run at the same time.
#[tokio::test]
async fn the_concurrency_limit_holds_across_checks() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    let overlaps = dir.path().join("overlaps");
    let script = format!(
        "if mkdir {0} 2>/dev/null; then sleep 0.4; rmdir {0}; else echo x >> {1}; fi",
        lock.display(),
        overlaps.display()
    );
    let running = start(
        dir.path(),
        &[("a", sh(&script)), ("b", sh(&script)), ("c", sh(&script))],
        1,
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let counts = running.runner.counts();
    running.stop().await;
    assert!(counts.runs >= 4, "{counts:?}");
    assert!(!overlaps.exists(), "two checks ran at once");
}

/// A check's HARD problem survives a restart of the runner, so its recovery after the
/// restart still raises the recovery event.
#[tokio::test]
async fn a_recovery_after_a_restart_is_still_announced() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    std::fs::write(&flag, "").unwrap();
    let script = format!("if [ -e {} ]; then exit 2; fi; echo fine", flag.display());
    let mut config = sh(&script);
    config.max_attempts = 1;
    let first = start(dir.path(), &[("svc", config.clone())], 1);
    let saved = dir.path().join("checks.json");
    for _ in 0..50 {
        if saved.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = first.stop().await;
    std::fs::remove_file(&flag).unwrap();
    let second = start(dir.path(), &[("svc", config)], 1);
    for _ in 0..50 {
        if second.runner.counts().events > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = second.stop().await;
    let events: Vec<&Record> = all.iter().filter(|r| r.stream == EVENTS_STREAM).collect();
    assert_eq!(events.len(), 2, "{before:?}\n{events:?}");
    let (down, up) = (events[0], events[1]);
    assert_eq!(down.event.as_ref().unwrap().severity.level(), 4);
    assert!(!down.event.as_ref().unwrap().clear);
    let up_event = up.event.as_ref().unwrap();
    assert!(up_event.clear, "{up:?}");
    assert_eq!(up_event.text, "svc: OK: fine");
    assert_eq!(
        up.check.as_ref().unwrap().previous,
        Some(CheckState::Critical)
    );
}

/// A submission for a check that is not configured, and an unreadable one, are set aside
/// as `*.rejected` and counted; a good one is taken in, its file removed.
#[tokio::test]
async fn submissions_the_agent_cannot_take_are_set_aside() {
    use super::super::passive::{self, Submission};
    let dir = tempfile::tempdir().unwrap();
    for check in ["kept", "gone"] {
        passive::submit(
            dir.path(),
            &Submission::now(check.into(), CheckState::Warning, "W | x=1".into()),
        )
        .unwrap();
    }
    let waiting = passive::submitted_dir(dir.path());
    std::fs::write(
        waiting.join("00000000000000000001-torn.json"),
        "{\"check\":",
    )
    .unwrap();
    let running = start(dir.path(), &[("kept", CheckConfig::passive(None))], 1);
    for _ in 0..50 {
        if running.runner.counts().rejected == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = running.runner.counts();
    let records = running.stop().await;
    assert_eq!((counts.submitted, counts.rejected), (1, 2), "{counts:?}");
    let mut left: Vec<String> = std::fs::read_dir(&waiting)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|n| n.ends_with(".rejected")), "{left:?}");
    let kept: Vec<&Record> = records
        .iter()
        .filter(|r| r.stream == CHECKS_STREAM)
        .collect();
    assert_eq!(kept.len(), 1);
    let result = kept[0].check.as_ref().unwrap();
    assert_eq!(
        (result.name.as_str(), result.status, result.passive),
        ("kept", CheckState::Warning, true)
    );
    assert_eq!(kept[0].metrics[0].value, Some(1.0));
}
