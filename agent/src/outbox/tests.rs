use super::*;

fn config(max_bytes: u64) -> OutboxConfig {
    OutboxConfig {
        max_bytes,
        segment_bytes: 4096,
        fsync_interval: Duration::from_millis(1),
    }
}

/// Cuts `bytes` off the newest segment file in `dir` (a torn write).
fn chop_last_segment(dir: &std::path::Path, bytes: u64) {
    let seg = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

fn seqs_of(items: &[OutboxItem]) -> Vec<u64> {
    items
        .iter()
        .map(|i| Record::decode(&i.payload).unwrap().seq)
        .collect()
}

#[test]
fn unacknowledged_records_come_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    for _ in 0..100 {
        ob.push("metrics", |_| {}).unwrap();
    }
    // acknowledge 0..10 in reverse order, and 50 alone
    for i in (0..10).rev() {
        ob.ack(i);
    }
    ob.ack(50);
    assert_eq!(ob.head(), 10);
    ob.sync().unwrap();
    drop(ob);

    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    let items = ob.read_from(0, 1000).unwrap();
    // 50 was acknowledged but not yet contiguous: after a restart it is sent again
    // (at-least-once), everything from seq 11 on, in order
    assert_eq!(seqs_of(&items), (11..=100).collect::<Vec<_>>());
    assert_eq!(items[0].topic, "fleet/a1/telemetry/metrics");
    // sequence numbers continue
    assert_eq!(ob.push("metrics", |_| {}).unwrap(), 101);
    assert_eq!(ob.push("events", |_| {}).unwrap(), 1);
}

#[test]
fn sequence_numbers_survive_when_everything_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    for _ in 0..500 {
        ob.push("metrics", |_| {}).unwrap();
    }
    for i in 0..500 {
        ob.ack(i);
    }
    ob.sync().unwrap();
    assert_eq!(ob.stats().pending, 0);
    drop(ob);
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count();
    assert_eq!(segments, 1, "acknowledged segments must be deleted");
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    assert!(ob.read_from(0, 10).unwrap().is_empty());
    assert_eq!(ob.push("metrics", |_| {}).unwrap(), 501);
}

#[test]
fn overflow_drops_the_oldest_and_reports_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(64 * 1024)).unwrap();
    let pad = "x".repeat(900);
    for _ in 0..200 {
        ob.push("metrics", |r| {
            r.fields.insert("pad".into(), pad.clone().into());
        })
        .unwrap();
    }
    let stats = ob.stats();
    assert!(stats.pending_bytes <= 64 * 1024, "{stats:?}");
    assert!(stats.dropped_total > 0);
    ob.commit().unwrap();
    let items = ob.read_from(0, 1000).unwrap();
    let seqs = seqs_of(&items);
    // the newest are kept, contiguous up to the last one pushed
    assert_eq!(*seqs.last().unwrap(), 200);
    assert_eq!(seqs.len() as u64 + stats.dropped_total, 200);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));

    assert_eq!(ob.report_drops().unwrap(), Some(stats.dropped_total));
    ob.commit().unwrap();
    let last = ob.read_from(0, 1000).unwrap().pop().unwrap();
    assert_eq!(last.topic, "fleet/a1/telemetry/events");
    let event = Record::decode(&last.payload).unwrap();
    assert_eq!(event.event.unwrap().class, OVERFLOW_CLASS);
    assert_eq!(event.fields["dropped"], stats.dropped_total);
    // storing the report does not push out more records that it could not count
    assert_eq!(ob.report_drops().unwrap(), None);
    assert_eq!(ob.stats().dropped_total, stats.dropped_total);
}

#[test]
fn a_torn_tail_past_the_saved_head_is_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    for i in 0..5 {
        ob.push("m", |_| {}).unwrap();
        ob.ack(i);
    }
    ob.sync().unwrap();
    drop(ob);
    chop_last_segment(dir.path(), 3);
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    assert_eq!(ob.stats().pending, 0);
    // the new record takes the cut record's index; it must be sent, and numbered on
    assert_eq!(ob.push("m", |_| {}).unwrap(), 6);
    ob.commit().unwrap();
    assert_eq!(seqs_of(&ob.read_from(0, 10).unwrap()), vec![6]);
}

#[test]
fn unreported_drops_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(64 * 1024)).unwrap();
    let pad = "x".repeat(2000);
    for _ in 0..100 {
        ob.push("m", |r| {
            r.fields.insert("pad".into(), pad.clone().into());
        })
        .unwrap();
    }
    let dropped = ob.stats().dropped_total;
    assert!(dropped > 0);
    ob.sync().unwrap();
    drop(ob);
    let ob = Outbox::open(dir.path(), "a1", &config(64 * 1024)).unwrap();
    assert_eq!(ob.report_drops().unwrap(), Some(dropped));
}

#[test]
fn torn_tail_recovers_every_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    for _ in 0..10 {
        ob.push("metrics", |_| {}).unwrap();
    }
    drop(ob); // no sync: like a kill -9 (records were handed to the OS on push)
    chop_last_segment(dir.path(), 3);
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    assert_eq!(
        seqs_of(&ob.read_from(0, 100).unwrap()),
        (1..=9).collect::<Vec<_>>()
    );
    // the torn record's sequence number is given again: it was never whole
    assert_eq!(ob.push("metrics", |_| {}).unwrap(), 10);
}

#[test]
fn bad_stream_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    assert!(ob.push("a/b", |_| {}).is_err());
    assert!(ob.push("#", |_| {}).is_err());
    assert_eq!(ob.stats().pending, 0);
}

#[test]
fn acknowledgements_by_stream_and_seq_ranges_remove_exactly_those_records() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    for _ in 0..10 {
        ob.push("m", |_| {}).unwrap();
        ob.push("e", |_| {}).unwrap();
    }
    ob.commit().unwrap();
    let epoch = Record::decode(&ob.read_from(0, 1).unwrap()[0].payload)
        .unwrap()
        .epoch
        .unwrap();
    // a stale epoch acknowledges nothing
    assert_eq!(ob.ack_ranges("m", epoch + 1, &[(1, 10)]), 0);
    assert_eq!(ob.ack_ranges("m", epoch, &[(1, 3), (5, 5)]), 4);
    assert_eq!(
        ob.ack_ranges("m", epoch, &[(1, 3)]),
        0,
        "repeats are harmless"
    );
    assert_eq!(ob.ack_ranges("e", epoch, &[(1, 1)]), 1);
    // m1 e1 m2 e2 m3 e3 m4 ...: head stops at e2 (index 3)
    assert_eq!(ob.head(), 3);
    let left: Vec<(String, u64)> = ob
        .read_from(0, 100)
        .unwrap()
        .iter()
        .map(|i| {
            let r = Record::decode(&i.payload).unwrap();
            (r.stream, r.seq)
        })
        .collect();
    assert!(!left.contains(&("m".to_string(), 5)));
    assert!(left.contains(&("m".to_string(), 4)));
    assert_eq!(left.len(), 20 - 5);
}

#[test]
fn the_epoch_is_kept_across_restarts_and_new_for_a_new_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let epoch_of = |ob: &Outbox| {
        ob.commit().unwrap();
        let items = ob.read_from(0, 1000).unwrap();
        Record::decode(&items.last().unwrap().payload)
            .unwrap()
            .epoch
            .unwrap()
    };
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    ob.push("m", |_| {}).unwrap();
    let first = epoch_of(&ob);
    drop(ob); // no sync: the epoch was saved when it was chosen
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    ob.push("m", |_| {}).unwrap();
    assert_eq!(epoch_of(&ob), first);
    let other = tempfile::tempdir().unwrap();
    let ob2 = Outbox::open(other.path(), "a1", &config(1 << 20)).unwrap();
    ob2.push("m", |_| {}).unwrap();
    assert_ne!(epoch_of(&ob2), first);
}

#[test]
fn records_are_released_for_publishing_only_once_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    for _ in 0..3 {
        ob.push("m", |_| {}).unwrap();
    }
    assert!(
        ob.read_from(0, 10).unwrap().is_empty(),
        "records not yet forced to disk must not be published"
    );
    assert!(ob.commit().unwrap());
    assert_eq!(seqs_of(&ob.read_from(0, 10).unwrap()), vec![1, 2, 3]);
    assert!(!ob.commit().unwrap(), "nothing new to commit");
    ob.push("m", |_| {}).unwrap();
    assert_eq!(seqs_of(&ob.read_from(0, 10).unwrap()), vec![1, 2, 3]);
    drop(ob);
    // reopening forces what a crash left to disk: everything is publishable again
    let ob = Outbox::open(dir.path(), "a1", &config(1 << 20)).unwrap();
    assert_eq!(seqs_of(&ob.read_from(0, 10).unwrap()), vec![1, 2, 3, 4]);
}
