use super::*;
use crate::manifest_of;
use crate::split::Splitter;
use rand::RngCore;
use std::io::Write;

fn limits() -> Limits {
    Limits {
        max_file_size: 1 << 20,
        quota_per_owner: 1 << 20,
        max_chunk_size: 4096,
        min_chunk_size: 1024,
        max_chunk_count: 1024,
        max_uploads_per_owner: 8,
        persist_every: 4,
    }
}

/// A random file of `size` bytes in `dir`, with its splitter.
fn random_file(dir: &Path, name: &str, size: usize) -> Splitter {
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    let path = dir.join(name);
    File::create(&path).unwrap().write_all(&data).unwrap();
    let m = manifest_of(File::open(&path).unwrap(), name, 4096).unwrap();
    Splitter::open(&path, m).unwrap()
}

fn send(r: &mut Reassembler, s: &Splitter, owner: &str, index: u32) -> PutOutcome {
    let c = s.chunk(index).unwrap().unwrap();
    r.put(
        owner,
        &s.manifest().file_id,
        c.index,
        c.offset,
        &c.data,
        &c.sha256,
    )
    .unwrap()
}

fn rejection(e: ChunkError) -> Rejection {
    e.rejection()
        .cloned()
        .unwrap_or_else(|| panic!("not a rejection: {e}"))
}

#[test]
fn chunks_in_any_order_with_duplicates_make_the_verified_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = random_file(dir.path(), "f.bin", 50_000);
    let (mut r, problems) = Reassembler::open(&dir.path().join("spool"), limits()).unwrap();
    assert!(problems.is_empty());
    let st = r.init("a1", s.manifest().clone()).unwrap();
    assert_eq!(st.chunk_count, 13);
    assert_eq!(st.missing().len(), 13);
    for i in (0..13).rev() {
        assert_eq!(send(&mut r, &s, "a1", i), PutOutcome::Stored);
    }
    assert_eq!(send(&mut r, &s, "a1", 5), PutOutcome::Duplicate);
    let done = r.finish("a1", &s.manifest().file_id).unwrap();
    assert_eq!(
        sha256_hex(&fs::read(&done.path).unwrap()),
        s.manifest().sha256
    );
    assert!(r.status("a1", &s.manifest().file_id).unwrap().complete);
}

#[test]
fn chunks_mostly_in_order_with_gaps_filled_late_verify() {
    // the whole-file hash runs while chunks arrive in order; chunks that came early are
    // read back once the gap before them is filled
    let dir = tempfile::tempdir().unwrap();
    let s = random_file(dir.path(), "f.bin", 60_000); // 15 chunks
    let (mut r, _) = Reassembler::open(&dir.path().join("spool"), limits()).unwrap();
    r.init("a1", s.manifest().clone()).unwrap();
    for i in [0, 1, 3, 4, 2, 2, 7, 5, 6, 8, 9, 14, 13, 12, 11, 10] {
        send(&mut r, &s, "a1", i);
    }
    let done = r.finish("a1", &s.manifest().file_id).unwrap();
    assert_eq!(
        sha256_hex(&fs::read(&done.path).unwrap()),
        s.manifest().sha256
    );
}

#[test]
fn a_restart_keeps_saved_chunks_and_asks_only_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let s = random_file(dir.path(), "f.bin", 40_000); // 10 chunks
    let id = s.manifest().file_id.clone();
    {
        let (mut r, _) = Reassembler::open(&spool, limits()).unwrap();
        r.init("a1", s.manifest().clone()).unwrap();
        for i in 0..6 {
            send(&mut r, &s, "a1", i);
        }
        // persisted every 4 chunks: 0-3 are saved, 4-5 are not (a crash now forgets them)
    }
    let (mut r, problems) = Reassembler::open(&spool, limits()).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let st = r.init("a1", s.manifest().clone()).unwrap();
    assert_eq!(st.held, vec![(0, 3)]);
    assert_eq!(st.missing(), (4..10).collect::<Vec<_>>());
    for i in st.missing() {
        send(&mut r, &s, "a1", i);
    }
    r.finish("a1", &id).unwrap();
}

#[test]
fn chunks_that_disagree_with_the_manifest_are_rejected_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = random_file(dir.path(), "f.bin", 10_000); // 3 chunks: 4096, 4096, 1808
    let id = s.manifest().file_id.clone();
    let (mut r, _) = Reassembler::open(&dir.path().join("spool"), limits()).unwrap();
    r.init("a1", s.manifest().clone()).unwrap();
    let c = s.chunk(1).unwrap().unwrap();

    let e = rejection(
        r.put("a1", &id, 1, c.offset, &c.data, &sha256_hex(b"other"))
            .unwrap_err(),
    );
    assert!(matches!(e, Rejection::ChunkHash { index: 1, .. }), "{e}");
    let e = rejection(r.put("a1", &id, 1, 12_345, &c.data, &c.sha256).unwrap_err());
    assert_eq!(
        e.to_string(),
        "chunk 1: offset 12345 disagrees with the manifest (expected 4096)"
    );
    let e = rejection(
        r.put("a1", &id, 7, 7 * 4096, &c.data, &c.sha256)
            .unwrap_err(),
    );
    assert!(
        matches!(e, Rejection::IndexOutOfRange { index: 7, count: 3 }),
        "{e}"
    );
    let short = &c.data[..100];
    let e = rejection(
        r.put("a1", &id, 1, c.offset, short, &sha256_hex(short))
            .unwrap_err(),
    );
    assert!(e.to_string().contains("length 100 disagrees"), "{e}");
    let e = rejection(r.put("a1", "nope", 0, 0, &c.data, &c.sha256).unwrap_err());
    assert_eq!(e, Rejection::UnknownUpload("nope".into()));

    assert!(
        r.status("a1", &id).unwrap().held.is_empty(),
        "nothing stored"
    );
    let e = rejection(r.finish("a1", &id).unwrap_err());
    assert!(matches!(e, Rejection::Incomplete { missing: 3, .. }), "{e}");
}

#[test]
fn a_manifest_that_lies_about_the_whole_file_is_caught_at_finish() {
    let dir = tempfile::tempdir().unwrap();
    let s = random_file(dir.path(), "f.bin", 9_000);
    let mut lie = s.manifest().clone();
    lie.sha256 = sha256_hex(b"something else");
    let (mut r, _) = Reassembler::open(&dir.path().join("spool"), limits()).unwrap();
    r.init("a1", lie.clone()).unwrap();
    for i in 0..lie.chunk_count {
        send(&mut r, &s, "a1", i);
    }
    let e = rejection(r.finish("a1", &lie.file_id).unwrap_err());
    assert!(matches!(e, Rejection::FileHash { .. }), "{e}");
    assert_eq!(
        r.status("a1", &lie.file_id).unwrap().missing().len(),
        lie.chunk_count as usize,
        "every chunk must be sent again"
    );
}

#[test]
fn size_and_quota_limits_are_enforced_per_owner() {
    let dir = tempfile::tempdir().unwrap();
    let big = random_file(dir.path(), "big.bin", 600_000);
    let big2 = random_file(dir.path(), "big2.bin", 600_000);
    let mut l = limits();
    l.max_file_size = 700_000;
    let (mut r, _) = Reassembler::open(&dir.path().join("spool"), l).unwrap();
    r.init("a1", big.manifest().clone()).unwrap();
    let e = rejection(r.init("a1", big2.manifest().clone()).unwrap_err());
    assert!(
        matches!(e, Rejection::QuotaExceeded { used: 600_000, .. }),
        "{e}"
    );
    // another owner is not affected
    r.init("a2", big2.manifest().clone()).unwrap();
    let huge = random_file(dir.path(), "huge.bin", 800_000);
    let e = rejection(r.init("a3", huge.manifest().clone()).unwrap_err());
    assert!(
        matches!(
            e,
            Rejection::TooLarge {
                size: 800_000,
                max: 700_000
            }
        ),
        "{e}"
    );
    // freeing a1's upload makes room again
    assert_eq!(
        r.remove("a1", &big.manifest().file_id).unwrap(),
        Some(600_000)
    );
    r.init("a1", big2.manifest().clone()).unwrap();
}

#[test]
fn abort_frees_the_spool_and_gc_removes_only_stale_unfinished_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let a = random_file(dir.path(), "a.bin", 5_000);
    let b = random_file(dir.path(), "b.bin", 5_000);
    let c = random_file(dir.path(), "c.bin", 5_000);
    let (mut r, _) = Reassembler::open(&spool, limits()).unwrap();
    for s in [&a, &b, &c] {
        r.init("a1", s.manifest().clone()).unwrap();
    }
    assert_eq!(r.remove("a1", &a.manifest().file_id).unwrap(), Some(5_000));
    assert!(!spool.join("a1").join(&a.manifest().file_id).exists());
    // c is complete: gc leaves it to whoever consumes it
    for i in 0..c.manifest().chunk_count {
        send(&mut r, &c, "a1", i);
    }
    r.finish("a1", &c.manifest().file_id).unwrap();
    let later = SystemTime::now() + Duration::from_secs(3600);
    let report = r.gc(Duration::from_secs(60), later).unwrap();
    assert_eq!(
        report.removed,
        vec![("a1".to_string(), b.manifest().file_id.clone())]
    );
    assert_eq!(report.bytes, 5_000);
    assert!(r.manifest("a1", &c.manifest().file_id).is_some());
    assert_eq!(
        r.gc(Duration::from_secs(60), later).unwrap(),
        GcReport::default()
    );
}

#[test]
fn the_same_file_again_is_the_same_upload_and_a_different_manifest_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = random_file(dir.path(), "f.bin", 5_000);
    let (mut r, _) = Reassembler::open(&dir.path().join("spool"), limits()).unwrap();
    r.init("a1", s.manifest().clone()).unwrap();
    send(&mut r, &s, "a1", 0);
    let again = r.init("a1", s.manifest().clone()).unwrap();
    assert_eq!(again.held, vec![(0, 0)]);
    let mut other = s.manifest().clone();
    other.meta.insert("case".into(), "INC-1".into());
    let e = rejection(r.init("a1", other).unwrap_err());
    assert!(matches!(e, Rejection::ManifestConflict(_)), "{e}");
    let e = rejection(r.init("../x", s.manifest().clone()).unwrap_err());
    assert!(e.to_string().contains("owner"), "{e}");
}

/// A manifest of `size` bytes in `chunk_size`-byte chunks (content never sent).
fn lying_manifest(name: &str, size: u64, chunk_size: u32) -> FileManifest {
    let mut m = manifest_of(&b"x"[..], name, chunk_size).unwrap();
    m.size = size;
    m.chunk_size = chunk_size;
    m.chunk_count = size.div_ceil(chunk_size as u64) as u32;
    m
}

/// A hostile manifest (tiny chunks, a huge file) is refused before any state is made for
/// it: a bit per chunk of a 4 GiB file in 1-byte chunks was 512 MiB of server memory.
#[test]
fn tiny_chunks_and_too_many_chunks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_file_size: 8 << 30,
        quota_per_owner: 8 << 30,
        ..limits()
    };
    let (mut r, _) = Reassembler::open(&dir.path().join("spool"), limits).unwrap();
    let tiny = rejection(r.init("a1", lying_manifest("a", 2 << 30, 1)).unwrap_err());
    assert!(tiny.to_string().contains("min_chunk_size"), "{tiny}");
    let many = rejection(
        r.init("a1", lying_manifest("b", 2 << 20, 1024))
            .unwrap_err(),
    );
    assert!(many.to_string().contains("max_chunks"), "{many}");
    assert!(r.uploads().is_empty());
    // a small file in one small chunk is fine
    r.init("a1", lying_manifest("c", 10, 10)).unwrap();
}

/// One owner cannot fill the spool with pending uploads, and pending uploads hold no file
/// descriptors: thousands of them once kept the server from starting ("Too many open
/// files").
#[test]
fn pending_uploads_are_bounded_per_owner_and_hold_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (mut r, _) = Reassembler::open(&spool, limits()).unwrap();
    for i in 0..8 {
        r.init("a1", lying_manifest(&format!("f{i}"), 2048, 1024))
            .unwrap();
    }
    let e = rejection(r.init("a1", lying_manifest("f9", 2048, 1024)).unwrap_err());
    assert!(
        matches!(e, Rejection::TooManyUploads { uploads: 8, .. }),
        "{e}"
    );
    // another owner is not affected
    r.init("a2", lying_manifest("g", 2048, 1024)).unwrap();
    // many owners' uploads: open descriptors stay bounded
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    for owner in 0..40 {
        for i in 0..4 {
            r.init(
                &format!("o{owner}"),
                lying_manifest(&format!("f{i}"), 2048, 1024),
            )
            .unwrap();
        }
    }
    assert!(
        fds() <= before + MAX_OPEN_FILES,
        "{} descriptors for 160 pending uploads",
        fds() - before
    );
    drop(r);
    // a restart opens none of them
    let before = fds();
    let (r, problems) = Reassembler::open(&spool, limits()).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(r.uploads().len(), 8 + 1 + 160);
    assert!(
        fds() <= before + 1,
        "{} descriptors after a restart",
        fds() - before
    );
}

/// Held ranges are reported the same however they are laid out across 64-chunk words.
#[test]
fn held_ranges_are_exact_across_words() {
    let dir = tempfile::tempdir().unwrap();
    let s = random_file(dir.path(), "f.bin", 300 * 4096 - 5);
    let (mut r, _) = Reassembler::open(
        &dir.path().join("spool"),
        Limits {
            max_file_size: 8 << 20,
            quota_per_owner: 8 << 20,
            ..limits()
        },
    )
    .unwrap();
    r.init("a1", s.manifest().clone()).unwrap();
    let sent: Vec<u32> = (0..300)
        .filter(|i| (i % 7 != 3) && !(60..140).contains(i))
        .collect();
    for &i in &sent {
        send(&mut r, &s, "a1", i);
    }
    let status = r.status("a1", &s.manifest().file_id).unwrap();
    let mut expect: Vec<(u32, u32)> = Vec::new();
    for &i in &sent {
        match expect.last_mut() {
            Some((_, hi)) if *hi + 1 == i => *hi = i,
            _ => expect.push((i, i)),
        }
    }
    assert_eq!(status.held, expect);
    assert_eq!(status.missing().len(), 300 - sent.len());
}
