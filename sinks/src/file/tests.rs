use fleetbus_protocol::Message;

use super::*;
use crate::Item;

fn config(path: &str) -> FileSinkConfig {
    FileSinkConfig {
        path: path.into(),
        completed_files: CompletedFiles::default(),
    }
}

fn batch(first: u64, seqs: std::ops::Range<u64>) -> Batch {
    let seqs_start = seqs.start;
    let items = seqs
        .map(|i| {
            let agent = ["a", "b", "c"][(i % 3) as usize];
            Item::new(
                first + i - seqs_start,
                Message::decode(
                    &format!("fleet/{agent}/telemetry/m"),
                    format!(r#"{{"seq":{i}}}"#).as_bytes(),
                )
                .unwrap(),
            )
        })
        .collect::<Vec<_>>();
    Batch {
        first,
        next: first + items.len() as u64,
        items,
    }
}

fn seqs(path: &Path) -> Vec<u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn writes_json_lines_into_templated_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = FileSink::new(
        "s",
        &config("t/{agent}/{stream}.jsonl"),
        dir.path(),
        &dir.path().join("state"),
    )
    .unwrap();
    sink.write(&batch(0, 0..5)).await.unwrap();
    assert_eq!(seqs(&dir.path().join("t/a/m.jsonl")), vec![0, 3]);
    assert_eq!(seqs(&dir.path().join("t/b/m.jsonl")), vec![1, 4]);
    let line = fs::read_to_string(dir.path().join("t/c/m.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["agent"], "c");
}

#[tokio::test]
async fn an_interrupted_batch_is_cut_back_and_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut sink = FileSink::new("s", &config("{agent}.jsonl"), dir.path(), &state).unwrap();
    sink.write(&batch(0, 0..3)).await.unwrap();
    sink.write(&batch(3, 3..9)).await.unwrap();
    // simulate a crash in the middle of the second batch: a.jsonl got only part of it
    let a = dir.path().join("a.jsonl");
    let full = fs::read(&a).unwrap();
    fs::write(&a, &full[..full.len() - 5]).unwrap();
    // the saved position says the second batch was not confirmed
    let mut sink = FileSink::new("s", &config("{agent}.jsonl"), dir.path(), &state).unwrap();
    assert_eq!(
        sink.recover(3).await.unwrap(),
        3,
        "resume at the interrupted batch"
    );
    sink.write(&batch(3, 3..9)).await.unwrap();
    assert_eq!(seqs(&a), vec![0, 3, 6]);
    assert_eq!(seqs(&dir.path().join("b.jsonl")), vec![1, 4, 7]);
}

#[tokio::test]
async fn a_complete_batch_is_not_written_again_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut sink = FileSink::new("s", &config("{agent}.jsonl"), dir.path(), &state).unwrap();
    sink.write(&batch(10, 0..3)).await.unwrap();
    // crash before the worker saved position 13: recovery says resume at 13
    let mut sink = FileSink::new("s", &config("{agent}.jsonl"), dir.path(), &state).unwrap();
    assert_eq!(sink.recover(10).await.unwrap(), 13);
    assert_eq!(sink.recover(13).await.unwrap(), 13);
}

#[tokio::test]
async fn unwritable_directory_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("blocker"),
        "a file where a directory should be",
    )
    .unwrap();
    let mut sink = FileSink::new(
        "s",
        &config("blocker/{agent}.jsonl"),
        dir.path(),
        &dir.path().join("state"),
    )
    .unwrap();
    let err = sink.write(&batch(0, 0..1)).await.unwrap_err();
    assert!(err.to_string().contains("blocker"), "{err}");
}

/// A verified spool file holding `bytes`, in a fresh directory.
fn spool_file(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool-data");
    fs::write(&spool, bytes).unwrap();
    (dir, spool)
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

#[test]
fn a_completed_file_is_linked_into_place_once_and_again_idempotently() {
    let (dir, spool) = spool_file(b"verified bytes");
    let to = dir.path().join("received/a/core.dump");
    place_file(&spool, &to, CompletedFiles::Link).unwrap();
    assert_eq!(fs::read(&to).unwrap(), b"verified bytes");
    assert_eq!(inode(&to), inode(&spool), "linked, not copied");
    // delivered again (a retry after a crash): still the one file, no temporary left over
    place_file(&spool, &to, CompletedFiles::Link).unwrap();
    assert_eq!(inode(&to), inode(&spool));
    let names: Vec<_> = fs::read_dir(to.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("core.dump")]);
    // the spool file removed afterwards (every sink delivered): the placed file stays
    fs::remove_file(&spool).unwrap();
    assert_eq!(fs::read(&to).unwrap(), b"verified bytes");
}

#[test]
fn a_completed_file_replaces_an_older_file_at_its_path() {
    let (dir, spool) = spool_file(b"new");
    let to = dir.path().join("core.dump");
    fs::write(&to, b"an older upload").unwrap();
    fs::write(
        dir.path().join("core.dump.fleetbus-tmp"),
        b"left by a crash",
    )
    .unwrap();
    place_file(&spool, &to, CompletedFiles::Link).unwrap();
    assert_eq!(fs::read(&to).unwrap(), b"new");
    assert!(!dir.path().join("core.dump.fleetbus-tmp").exists());
}

#[test]
fn completed_files_copy_makes_a_file_of_its_own() {
    let (dir, spool) = spool_file(b"verified bytes");
    let to = dir.path().join("out/core.dump");
    place_file(&spool, &to, CompletedFiles::Copy).unwrap();
    assert_eq!(fs::read(&to).unwrap(), b"verified bytes");
    assert_ne!(inode(&to), inode(&spool), "a copy of its own");
    place_file(&spool, &to, CompletedFiles::Copy).unwrap();
    assert_eq!(fs::read(&to).unwrap(), b"verified bytes");
}

#[test]
fn completed_files_setting_parses() {
    let c: FileSinkConfig = toml::from_str("path = \"x\"\ncompleted_files = \"copy\"").unwrap();
    assert_eq!(c.completed_files, CompletedFiles::Copy);
    let c: FileSinkConfig = toml::from_str("path = \"x\"").unwrap();
    assert_eq!(c.completed_files, CompletedFiles::Link);
    assert!(toml::from_str::<FileSinkConfig>("path = \"x\"\ncompleted_files = \"move\"").is_err());
}

#[test]
fn a_completed_file_on_another_filesystem_is_copied() {
    use std::os::unix::fs::MetadataExt;
    // /dev/shm is a tmpfs of its own on Linux; the test's directory is on the disk
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: /dev/shm not available");
        return;
    };
    let spool = shm.path().join("spool-data");
    fs::write(&spool, b"verified bytes").unwrap();
    let dir = tempfile::tempdir().unwrap();
    if fs::metadata(dir.path()).unwrap().dev() == fs::metadata(shm.path()).unwrap().dev() {
        eprintln!("skipped: /dev/shm is on the same filesystem as the temporary directory");
        return;
    }
    let to = dir.path().join("core.dump");
    place_file(&spool, &to, CompletedFiles::Link).unwrap();
    assert_eq!(fs::read(&to).unwrap(), b"verified bytes");
    assert_ne!(inode(&to), inode(&spool));
    assert!(!dir.path().join("core.dump.fleetbus-tmp").exists());
}

/// A marker garbled by something outside the sink (two servers on one data_dir did it):
/// recovery sets it aside and resumes from the saved position; nothing is lost.
#[tokio::test]
async fn a_garbled_marker_is_set_aside_and_the_sink_resumes_from_its_saved_position() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut sink = FileSink::new("s", &config("{agent}.jsonl"), dir.path(), &state).unwrap();
    sink.write(&batch(0, 0..3)).await.unwrap();
    sink.write(&batch(3, 3..6)).await.unwrap();
    fs::write(state.join("s.marker"), b"{\"first\":3,\"ne\x00\x00garbage").unwrap();
    // the position saved last covers the first batch only
    let mut sink = FileSink::new("s", &config("{agent}.jsonl"), dir.path(), &state).unwrap();
    assert_eq!(sink.recover(3).await.unwrap(), 3);
    let aside: Vec<String> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("s.marker.garbled-"))
        .collect();
    assert_eq!(aside.len(), 1, "kept for a look");
    // the batch after the saved position is written again: present, maybe twice, never lost
    sink.write(&batch(3, 3..6)).await.unwrap();
    sink.write(&batch(6, 6..9)).await.unwrap();
    let mut all: Vec<u64> = ["a", "b", "c"]
        .iter()
        .flat_map(|a| seqs(&dir.path().join(format!("{a}.jsonl"))))
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all, (0..9).collect::<Vec<_>>());
}
