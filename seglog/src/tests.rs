use super::*;

fn opts() -> SegLogOptions {
    SegLogOptions {
        segment_bytes: 256,
        max_record_bytes: 1024,
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("record-{i}").into_bytes()
}

#[test]
fn records_survive_reopen_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), opts()).unwrap();
    for i in 0..100 {
        assert_eq!(log.append(&payload(i)).unwrap(), i);
    }
    log.sync().unwrap();
    drop(log);
    let segs = fs::read_dir(dir.path()).unwrap().count();
    assert!(segs > 3, "expected several segments, got {segs}");
    let (mut log, rec) = SegLog::open(dir.path(), opts()).unwrap();
    assert_eq!(rec.records, 100);
    assert!(rec.cuts.is_empty());
    for i in 0..100 {
        assert_eq!(log.read(i).unwrap().unwrap(), payload(i));
    }
    assert_eq!(log.append(b"next").unwrap(), 100);
}

#[test]
fn torn_tail_is_cut_and_everything_before_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), SegLogOptions::default()).unwrap();
    for i in 0..10 {
        log.append(&payload(i)).unwrap();
    }
    log.flush().unwrap();
    drop(log);
    let seg = segment_path(dir.path(), 0);
    let len = fs::metadata(&seg).unwrap().len();
    // chop the last record in half
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    let (mut log, rec) = SegLog::open(dir.path(), SegLogOptions::default()).unwrap();
    assert_eq!(rec.records, 9);
    assert_eq!(rec.cuts.len(), 1);
    for i in 0..9 {
        assert_eq!(log.read(i).unwrap().unwrap(), payload(i));
    }
    // the cut record's index is reused by the next append: it was never whole
    assert_eq!(log.append(b"after").unwrap(), 9);
    log.flush().unwrap();
    drop(log);
    let (mut log, rec) = SegLog::open(dir.path(), SegLogOptions::default()).unwrap();
    assert_eq!(rec.records, 10);
    assert_eq!(log.read(9).unwrap().unwrap(), b"after");
}

#[test]
fn garbage_appended_to_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), SegLogOptions::default()).unwrap();
    log.append(b"one").unwrap();
    log.flush().unwrap();
    drop(log);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(segment_path(dir.path(), 0))
        .unwrap();
    f.write_all(&[3, 0, 0, 0, 1, 2, 3, 4, b'x', b'y', b'z'])
        .unwrap();
    drop(f);
    let (mut log, rec) = SegLog::open(dir.path(), SegLogOptions::default()).unwrap();
    assert_eq!(rec.records, 1);
    assert_eq!(rec.cuts.len(), 1, "bad checksum must be cut");
    assert_eq!(log.read(0).unwrap().unwrap(), b"one");
}

#[test]
fn remove_before_deletes_old_segments_but_keeps_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), opts()).unwrap();
    for i in 0..50 {
        log.append(&payload(i)).unwrap();
    }
    log.remove_before(50).unwrap();
    assert!(log.is_empty());
    assert_eq!(log.live_bytes(), 0);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    log.flush().unwrap();
    drop(log);
    let (mut log, _) = SegLog::open(dir.path(), opts()).unwrap();
    assert!(log.first_index() <= 50);
    let idx = log.append(b"x").unwrap();
    assert!(idx >= 50, "index went backwards: {idx}");
    assert_eq!(log.read(idx).unwrap().unwrap(), b"x");
}

#[test]
fn read_range_and_prepare_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), opts()).unwrap();
    for i in 0..30 {
        log.append(&payload(i)).unwrap();
    }
    let (handle, durable_upto) = log.prepare_sync().unwrap();
    handle.sync_data().unwrap();
    assert_eq!(durable_upto, 30);
    log.remove_before(5).unwrap();
    let got = log.read_range(0, 10).unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(got[0], (5, payload(5)));
    assert_eq!(got[9].0, 14);
    assert!(log.read_range(30, 10).unwrap().is_empty());
}

#[test]
fn oversized_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), opts()).unwrap();
    let err = log.append(&vec![0u8; 2000]).unwrap_err();
    assert!(matches!(err, SegLogError::RecordTooLarge { .. }));
    assert!(log.is_empty());
}

#[test]
fn foreign_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(segment_path(dir.path(), 0), b"hello world, not a log").unwrap();
    let err = SegLog::open(dir.path(), opts()).unwrap_err().to_string();
    assert!(err.contains("00000000000000000000.seg"), "{err}");
    assert!(err.contains("bad magic"), "{err}");
}

#[test]
fn range_reads_span_segments_and_see_unflushed_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), opts()).unwrap();
    for i in 0..60 {
        log.append(&payload(i)).unwrap();
    }
    // nothing flushed yet: a range read must still return every record, in order
    let mut seen = Vec::new();
    let n = log
        .visit_range(3, 50, |i, p| seen.push((i, p.to_vec())))
        .unwrap();
    assert_eq!(n, 50);
    let expected: Vec<_> = (3..53).map(|i| (i, payload(i))).collect();
    assert_eq!(seen, expected);
}

#[test]
fn corruption_inside_a_range_read_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegLog::open(dir.path(), SegLogOptions::default()).unwrap();
    for i in 0..10 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    // flip one payload byte of record 4 behind the log's back
    let seg = dir.path().join(format!("{:020}.seg", 0));
    let mut bytes = fs::read(&seg).unwrap();
    let at = HEADER_LEN as usize
        + (0..4)
            .map(|i| RECORD_OVERHEAD as usize + payload(i).len())
            .sum::<usize>()
        + RECORD_OVERHEAD as usize;
    bytes[at] ^= 0xff;
    fs::write(&seg, bytes).unwrap();
    let e = log.read_range(0, 10).unwrap_err();
    assert!(
        e.to_string().contains("checksum"),
        "error should name the checksum: {e}"
    );
}
