//! End to end: files uploaded by in-process agents through a real `fleetbus serve` process
//! into a real S3-protocol server (s3s-fs, SigV4 checked) and the file sink.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, metric, scrape, ServeProc};
use fleetbus_agent::config::UploadsConfig;
use fleetbus_agent::{AfterUpload, Agent, AgentConfig, UploadOutcome, UploadQueue};
use fleetbus_protocol::files::{self as wire, FileAction};
use fleetbus_protocol::{FileChunk, FileInit, FileManifest, FileReply, RefusalKind};
use fleetbus_testkit::{CutProxy, S3Server, S3_ACCESS_KEY, S3_SECRET_KEY};
use rand::RngCore;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// A server process with its own data dir, metrics endpoint and rules.
struct Server {
    port: u16,
    metrics_port: u16,
    proc: ServeProc,
}

impl Server {
    fn start(dir: &Path, rules: &str, files: &str) -> Server {
        let port = free_port();
        let metrics_port = free_port();
        fs::write(dir.join("rules.toml"), rules).unwrap();
        let proc = ServeProc::start(
            dir,
            &format!(
                "data_dir = \"data\"\n{}[broker]\nlisten = \"127.0.0.1:{port}\"\n[rules]\nfile = \"rules.toml\"\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[files]\n{files}\n",
                common::admin_table()
            ),
            move || !scrape(metrics_port).is_empty(),
        );
        Server {
            port,
            metrics_port,
            proc,
        }
    }

    fn launch(&mut self) {
        self.proc.launch();
    }

    fn kill(&mut self) {
        self.proc.kill();
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    fn data(&self) -> PathBuf {
        self.proc.dir.join("data")
    }

    /// A counter of the metrics endpoint (0 when absent).
    fn metric(&self, name: &str) -> u64 {
        metric(&scrape(self.metrics_port), name)
    }
}

/// An in-process agent.
struct TestAgent {
    uploads: Arc<UploadQueue>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    fn start(dir: &Path, id: &str, port: u16, adjust: impl FnOnce(&mut AgentConfig)) -> TestAgent {
        let mut config = AgentConfig {
            server: format!("mqtt://127.0.0.1:{port}").parse().unwrap(),
            state_dir: dir.join(format!("state-{id}")),
            id: Some(id.into()),
            uploads: UploadsConfig {
                reply_timeout: Duration::from_secs(2),
                retry_min: Duration::from_millis(200),
                ..UploadsConfig::default()
            },
            ..AgentConfig::default()
        };
        config.metrics.enabled = false;
        config.connection.backoff_min = Duration::from_millis(100);
        config.connection.backoff_max = Duration::from_millis(500);
        adjust(&mut config);
        let agent = Agent::open(fleetbus_agent::Valid::new(config).unwrap()).unwrap();
        let uploads = agent.uploads().clone();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            agent.run(rx).await.unwrap();
        });
        TestAgent {
            uploads,
            stop,
            task,
        }
    }

    /// Queues `path` with `meta`; returns its file id and chunk count.
    fn upload(&self, path: &Path, meta: &[(&str, &str)]) -> (String, u32) {
        let meta: BTreeMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let job =
            UploadQueue::prepare(path, self.uploads.chunk_size(), meta, AfterUpload::Keep).unwrap();
        self.uploads.submit(&job).unwrap();
        (job.manifest.file_id, job.manifest.chunk_count)
    }

    async fn confirmed(&self, file_id: &str, within: Duration) {
        let outcome = tokio::time::timeout(within, self.uploads.wait(file_id))
            .await
            .unwrap_or_else(|_| panic!("upload {file_id} not finished within {within:?}"));
        assert!(
            matches!(outcome, UploadOutcome::Confirmed { .. }),
            "{outcome:?}"
        );
    }

    fn held(&self) -> u32 {
        self.uploads.progress().borrow().held
    }

    fn sent(&self) -> u64 {
        self.uploads.stats().chunks_sent.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn random_file(dir: &Path, name: &str, size: usize) -> (PathBuf, String) {
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    let path = dir.join(name);
    fs::write(&path, &data).unwrap();
    (path, hex::encode(Sha256::digest(&data)))
}

fn sha_of(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Upload directories left in the spool (delivered files are removed).
fn spool_uploads(data: &Path) -> usize {
    fs::read_dir(data.join("files/spool"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|owner| fs::read_dir(owner.path()).into_iter().flatten().count())
        .sum()
}

const LOCAL_RULES: &str = r#"
[sinks.local]
type = "file"
path = "received/{agent}/{file.name}"

[sinks.archive]
type = "file"
path = "telemetry/{agent}/{stream}.jsonl"

[[rules]]
name = "files"
from = ["fleet/+/files/+/complete"]
to = ["local"]

[[rules]]
name = "telemetry"
from = ["fleet/+/telemetry/#"]
to = ["archive"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_file_lands_in_s3_and_metadata_routes_another_to_the_file_sink() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"), &["samples"])
        .await
        .unwrap();
    let rules = format!(
        r#"
[sinks.samples]
type = "s3"
bucket = "samples"
endpoint = "{}"
access_key_id = "{S3_ACCESS_KEY}"
secret_access_key = "{S3_SECRET_KEY}"
key = "{{agent}}/%Y/%m/%d/{{file.name}}-{{file.sha256}}"

[sinks.local]
type = "file"
path = "received/{{agent}}/{{file.name}}"

[[rules]]
name = "samples-to-s3"
from = ["fleet/+/files/+/complete"]
where = 'record.file.meta.case.startsWith("INC-")'
to = ["samples"]

[[rules]]
name = "the-rest-to-disk"
from = ["fleet/+/files/+/complete"]
where = '!has(record.file.meta.case)'
to = ["local"]
"#,
        s3.endpoint()
    );
    let server = Server::start(dir.path(), &rules, "");
    let agent = TestAgent::start(dir.path(), "a1", server.port, |_| {});
    let (big, big_sha) = random_file(dir.path(), "core.dump", 50 * 1024 * 1024);
    let (small, small_sha) = random_file(dir.path(), "notes.bin", 300 * 1024);

    let (big_id, chunks) = agent.upload(&big, &[("case", "INC-42")]);
    agent.confirmed(&big_id, Duration::from_secs(120)).await;
    let (small_id, _) = agent.upload(&small, &[]);
    agent.confirmed(&small_id, Duration::from_secs(60)).await;

    // the big one in S3 under a1/YYYY/MM/DD/core.dump-SHA, nowhere else
    let wanted = format!("core.dump-{big_sha}");
    let object = tokio::task::spawn_blocking({
        let root = dir.path().join("s3/samples");
        move || {
            let found = common::poll_until(Duration::from_secs(30), || {
                files_under(&root).iter().any(|p| p.ends_with(&wanted))
            });
            assert!(found, "no object named {wanted} in the bucket");
            files_under(&root)
                .into_iter()
                .find(|p| p.ends_with(&wanted))
                .unwrap()
        }
    })
    .await
    .unwrap();
    let key = object
        .strip_prefix(dir.path().join("s3/samples"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let parts: Vec<&str> = key.split('/').collect();
    assert_eq!(parts.len(), 5, "{key}");
    assert_eq!(parts[0], "a1");
    assert!(
        parts[1].len() == 4 && parts[2].len() == 2 && parts[3].len() == 2,
        "{key}"
    );
    assert_eq!(sha_of(&object), big_sha);
    assert!(!server.data().join("received/a1/core.dump").exists());
    // the one without a case went to the file sink only
    let local = server.data().join("received/a1/notes.bin");
    let data = server.data();
    assert!(
        common::poll_until(Duration::from_secs(30), || local.exists()),
        "{}",
        server.log()
    );
    assert_eq!(sha_of(&local), small_sha);
    assert!(!files_under(&dir.path().join("s3/samples"))
        .iter()
        .any(|p| p.to_string_lossy().contains("notes.bin")));
    assert!(server.metric("fleetbus_files_chunks_stored_total") >= chunks as u64);

    // delivered: the spool is empty again
    assert!(
        common::poll_until(Duration::from_secs(30), || spool_uploads(&data) == 0),
        "spool not freed"
    );
    // the file sink's file (a link to the spool file by default) outlives the spool's name
    assert_eq!(sha_of(&local), small_sha);

    // the same file again: confirmed at once, not one chunk sent, not announced twice
    let sent_before = agent.sent();
    let completed_before = server.metric("fleetbus_files_completed_total");
    let (again, _) = agent.upload(&big, &[("case", "INC-42")]);
    assert_eq!(again, big_id);
    agent.confirmed(&again, Duration::from_secs(30)).await;
    assert_eq!(agent.sent(), sent_before);
    assert_eq!(
        server.metric("fleetbus_files_completed_total"),
        completed_before
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_with_only_the_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), LOCAL_RULES, "");
    let proxy = CutProxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap())
        .await
        .unwrap();
    let window = 16;
    let agent = TestAgent::start(dir.path(), "cut1", proxy.addr().port(), |c| {
        c.uploads.window = window;
        c.uploads.max_bytes_per_sec = Some(16 * 1024 * 1024);
    });
    let (file, sha) = random_file(dir.path(), "bundle.tar", 24 * 1024 * 1024);
    let (id, chunks) = agent.upload(&file, &[]);
    let started = Instant::now();
    while agent.held() < chunks / 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "upload does not progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.cut();
    agent.confirmed(&id, Duration::from_secs(120)).await;

    let stored = server.metric("fleetbus_files_chunks_stored_total");
    let duplicates = server.metric("fleetbus_files_chunks_duplicate_total");
    assert_eq!(stored, chunks as u64, "every chunk stored exactly once");
    let sent = agent.sent();
    // re-sent at most what was in flight when the connection dropped
    assert!(
        sent <= chunks as u64 + window as u64,
        "sent {sent} chunk messages for {chunks} chunks"
    );
    assert!(duplicates <= window as u64, "{duplicates} duplicates");
    let copy = server.data().join("received/cut1/bundle.tar");
    assert!(common::poll_until(Duration::from_secs(30), || copy.exists()));
    assert_eq!(sha_of(&copy), sha);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_continues_without_starting_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), LOCAL_RULES, "persist_every = 8");
    let agent = TestAgent::start(dir.path(), "r1", server.port, |c| {
        c.uploads.max_bytes_per_sec = Some(12 * 1024 * 1024);
    });
    let (file, sha) = random_file(dir.path(), "dump.bin", 24 * 1024 * 1024);
    let (id, chunks) = agent.upload(&file, &[]);
    let started = Instant::now();
    while agent.held() < chunks / 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "upload does not progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.launch();
    agent.confirmed(&id, Duration::from_secs(120)).await;
    // the restarted server received only what it did not hold
    let stored_after_restart = server.metric("fleetbus_files_chunks_stored_total");
    assert!(
        stored_after_restart < (chunks as u64) * 2 / 3,
        "{stored_after_restart} of {chunks} chunks sent again after the restart"
    );
    let copy = server.data().join("received/r1/dump.bin");
    assert!(common::poll_until(Duration::from_secs(30), || copy.exists()));
    assert_eq!(sha_of(&copy), sha);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_keeps_flowing_during_a_large_upload() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), LOCAL_RULES, "");
    let agent = TestAgent::start(dir.path(), "t1", server.port, |c| {
        c.heartbeat.enabled = true;
        c.heartbeat.interval = Duration::from_millis(20);
        c.uploads.max_bytes_per_sec = Some(16 * 1024 * 1024);
    });
    let (file, _) = random_file(dir.path(), "big.bin", 48 * 1024 * 1024);
    let (id, chunks) = agent.upload(&file, &[]);
    let records = || {
        common::summary(&server.data(), "t1", "heartbeat")
            .map(|s| s.records)
            .unwrap_or(0)
    };
    let started = Instant::now();
    while agent.held() < chunks / 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "upload does not progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let early = records();
    while agent.held() < chunks * 3 / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let late = records();
    assert!(
        agent.uploads.outcome(&id).is_none(),
        "the upload must still be running"
    );
    // ~1.5 s between the samples at 50 heartbeats/s
    assert!(
        late >= early + 20,
        "only {early} -> {late} records during the upload"
    );
    agent.confirmed(&id, Duration::from_secs(120)).await;
    agent.stop().await;
}

/// A raw MQTT client speaking the file protocol by hand.
struct Raw {
    agent: String,
    client: AsyncClient,
    replies: tokio::sync::mpsc::Receiver<FileReply>,
}

impl Raw {
    async fn connect(id: &str, port: u16) -> Raw {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (tx, replies) = tokio::sync::mpsc::channel(64);
        tokio::spawn(pump(eventloop, tx));
        client
            .subscribe(wire::file_replies(id), QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        Raw {
            agent: id.into(),
            client,
            replies,
        }
    }

    async fn send(&self, file_id: &str, action: FileAction, payload: Vec<u8>) {
        self.client
            .publish(
                wire::file_topic(&self.agent, file_id, action),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    async fn reply(&mut self) -> FileReply {
        tokio::time::timeout(Duration::from_secs(10), self.replies.recv())
            .await
            .expect("no reply within 10s")
            .expect("connection gone")
    }

    async fn init(&mut self, m: &FileManifest) -> FileReply {
        let payload = wire::encode(&FileInit {
            manifest: m.clone(),
        })
        .unwrap();
        self.send(&m.file_id, FileAction::Init, payload).await;
        self.reply().await
    }

    async fn chunk(
        &mut self,
        file_id: &str,
        index: u32,
        offset: u64,
        data: &[u8],
        sha: &str,
    ) -> FileReply {
        let c = FileChunk {
            index,
            offset,
            sha256: sha.into(),
            data: data.into(),
        };
        self.send(file_id, FileAction::Chunk, wire::encode(&c).unwrap())
            .await;
        self.reply().await
    }
}

async fn pump(mut eventloop: EventLoop, tx: tokio::sync::mpsc::Sender<FileReply>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(r) = fleetbus_protocol::message::decode_as::<FileReply>(&p.payload) {
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn manifest_for(data: &[u8], name: &str, chunk_size: u32) -> FileManifest {
    let m = fleetbus_chunker::manifest_of(data, name, chunk_size).unwrap();
    FileManifest {
        file_id: m.file_id,
        name: m.name,
        size: m.size,
        sha256: m.sha256,
        chunk_size: m.chunk_size,
        chunk_count: m.chunk_count,
        content_type: None,
        meta: BTreeMap::new(),
    }
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn failed_with(reply: &FileReply, kind: RefusalKind, words: &str) {
    match reply {
        FileReply::Failed {
            kind: k, reason, ..
        } => {
            assert_eq!(*k, kind, "{reason}");
            assert!(reason.contains(words), "`{reason}` does not say `{words}`");
        }
        other => panic!("expected a {kind:?} refusal, got {other:?}"),
    }
}

fn rejected_with(reply: &FileReply, words: &str) {
    match reply {
        FileReply::Chunk {
            outcome: fleetbus_protocol::ChunkOutcome::Rejected,
            reason: Some(reason),
            ..
        } => assert!(reason.contains(words), "`{reason}` does not say `{words}`"),
        other => panic!("expected a rejected chunk, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunks_lying_manifests_quota_abort_and_ttl_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        LOCAL_RULES,
        "quota_per_agent = 4194304\nttl = \"2s\"",
    );
    let mut raw = Raw::connect("raw1", server.port).await;
    let mut data = vec![0u8; 3000];
    rand::rng().fill_bytes(&mut data);
    let m = manifest_for(&data, "x.bin", 1024);
    let id = m.file_id.clone();
    assert!(matches!(raw.init(&m).await, FileReply::Status { ref held, .. } if held.is_empty()));

    // a chunk with a wrong hash is rejected, then accepted when sent right
    let r = raw
        .chunk(&id, 0, 0, &data[..1024], &sha_hex(b"other"))
        .await;
    rejected_with(&r, "SHA-256");
    let r = raw
        .chunk(&id, 0, 0, &data[..1024], &sha_hex(&data[..1024]))
        .await;
    assert!(
        matches!(
            r,
            FileReply::Chunk {
                outcome: fleetbus_protocol::ChunkOutcome::Stored,
                ..
            }
        ),
        "{r:?}"
    );
    // an offset past the end, a chunk longer than the manifest says, an index beyond it
    let r = raw
        .chunk(
            &id,
            1,
            99_999,
            &data[1024..2048],
            &sha_hex(&data[1024..2048]),
        )
        .await;
    rejected_with(&r, "offset");
    let r = raw
        .chunk(&id, 1, 1024, &data[1024..], &sha_hex(&data[1024..]))
        .await;
    rejected_with(&r, "length");
    let r = raw
        .chunk(&id, 7, 7 * 1024, &data[..10], &sha_hex(&data[..10]))
        .await;
    rejected_with(&r, "out of range");
    // nothing of that was stored: the server holds chunk 0 only, and finishing is refused
    raw.send(&id, FileAction::Status, Vec::new()).await;
    assert!(
        matches!(raw.reply().await, FileReply::Status { ref held, .. } if held == &vec![(0, 0)])
    );
    raw.send(&id, FileAction::Finish, Vec::new()).await;
    failed_with(&raw.reply().await, RefusalKind::Incomplete, "2 of 3");

    // a manifest that lies about the size; one whose chunks are over the limit
    let mut liar = manifest_for(&data, "liar.bin", 1024);
    liar.size = 10;
    failed_with(
        &raw.init(&liar).await,
        RefusalKind::BadManifest,
        "chunk_count",
    );
    let huge = manifest_for(&data, "huge.bin", 200_000);
    failed_with(
        &raw.init(&huge).await,
        RefusalKind::BadManifest,
        "chunk_size",
    );

    // abort frees the spool at once
    raw.send(&id, FileAction::Abort, Vec::new()).await;
    assert!(matches!(raw.reply().await, FileReply::Aborted { .. }));
    assert!(!server.data().join("files/spool/raw1").join(&id).exists());
    assert_eq!(server.metric("fleetbus_files_aborted_total"), 1);

    // quota: raw1 may not spool 5 MiB; raw2 is not affected
    let big = vec![1u8; 5 * 1024 * 1024];
    let over = manifest_for(&big, "over.bin", 128 * 1024);
    failed_with(&raw.init(&over).await, RefusalKind::Quota, "quota exceeded");
    let mut raw2 = Raw::connect("raw2", server.port).await;
    let ok = manifest_for(&big[..1024 * 1024], "ok.bin", 128 * 1024);
    assert!(matches!(raw2.init(&ok).await, FileReply::Status { .. }));

    // an upload left idle longer than files.ttl is collected
    let spool = server.data().join("files/spool/raw2").join(&ok.file_id);
    assert!(spool.exists());
    let gone = tokio::task::spawn_blocking(move || {
        common::poll_until(Duration::from_secs(15), || !spool.exists())
    });
    assert!(gone.await.unwrap(), "idle upload not collected");
    assert!(server.metric("fleetbus_files_collected_total") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_lost_on_the_way_is_reported_when_a_later_one_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), LOCAL_RULES, "");
    let mut raw = Raw::connect("raw-gap", server.port).await;
    let mut data = vec![0u8; 4096];
    rand::rng().fill_bytes(&mut data);
    let m = manifest_for(&data, "gap.bin", 1024);
    let id = m.file_id.clone();
    assert!(matches!(raw.init(&m).await, FileReply::Status { .. }));
    let part = |i: usize| &data[i * 1024..(i + 1) * 1024];
    let outcome = |r: &FileReply| match r {
        FileReply::Chunk { index, outcome, .. } => (*index, outcome.clone()),
        other => panic!("expected a chunk reply, got {other:?}"),
    };
    use fleetbus_protocol::ChunkOutcome::{Lost, Stored};
    let r = raw.chunk(&id, 0, 0, part(0), &sha_hex(part(0))).await;
    assert_eq!(outcome(&r), (0, Stored));
    // chunks 1 and 2 "lost on the way": chunk 3 arrives next
    let r = raw.chunk(&id, 3, 3072, part(3), &sha_hex(part(3))).await;
    assert_eq!(outcome(&r), (1, Lost), "{r:?}");
    assert_eq!(outcome(&raw.reply().await), (2, Lost));
    assert_eq!(outcome(&raw.reply().await), (3, Stored));
    // sent again (lower indexes than the last): stored, nothing reported
    for i in [1usize, 2] {
        let r = raw
            .chunk(&id, i as u32, (i * 1024) as u64, part(i), &sha_hex(part(i)))
            .await;
        assert_eq!(outcome(&r), (i as u32, Stored));
    }
    raw.send(&id, FileAction::Finish, Vec::new()).await;
    assert!(matches!(raw.reply().await, FileReply::Complete { .. }));
    assert_eq!(server.metric("fleetbus_files_chunks_lost_total"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_dropped_into_the_upload_directory_are_archived_after_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), LOCAL_RULES, "");
    let (watch_dir, archive) = (dir.path().join("outgoing"), dir.path().join("archive"));
    fs::create_dir_all(&watch_dir).unwrap();
    let agent = TestAgent::start(dir.path(), "w1", server.port, |c| {
        c.uploads.watch_dir = Some(watch_dir.clone());
        c.uploads.archive_dir = Some(archive.clone());
        c.uploads.poll_interval = Duration::from_millis(100);
    });
    let (_, sha) = random_file(&watch_dir, "sample.exe", 700 * 1024);
    let archived = archive.join("sample.exe");
    let received = server.data().join("received/w1/sample.exe");
    let done = tokio::task::spawn_blocking({
        let (a, r) = (archived.clone(), received.clone());
        move || common::poll_until(Duration::from_secs(60), || a.exists() && r.exists())
    });
    assert!(
        done.await.unwrap(),
        "not uploaded and archived:\n{}",
        server.log()
    );
    assert!(!watch_dir.join("sample.exe").exists());
    assert_eq!(sha_of(&archived), sha);
    assert_eq!(sha_of(&received), sha);
    agent.stop().await;
}

/// Hardening findings 5 and 6: a manifest with 1-byte chunks of a huge file took 517 MiB of
/// server memory and seconds per status answer; 3,000 pending one-byte uploads held 3,029
/// file descriptors, and with that many in the spool the server could not even start. Now
/// chunk size and count are bounded, each agent may have a bounded number of unfinished
/// uploads, pending uploads hold no descriptor, and a restart with a full spool works with
/// few descriptors to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_and_piles_of_pending_uploads_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), LOCAL_RULES, "max_uploads_per_agent = 40");
    let pid = server.proc.pid().unwrap();
    let rss_before = common::resident_kib(pid);
    let mut raw = Raw::connect("hostile", server.port).await;
    let mut tiny = manifest_for(b"x", "big.bin", 1024);
    tiny.size = 2 << 30;
    tiny.chunk_size = 1;
    tiny.chunk_count = 2 << 30;
    failed_with(
        &raw.init(&tiny).await,
        RefusalKind::BadManifest,
        "min_chunk_size",
    );
    let mut many = manifest_for(b"x", "many.bin", 1024);
    many.size = 4 << 30;
    many.chunk_count = 4 * 1024 * 1024;
    failed_with(
        &raw.init(&many).await,
        RefusalKind::BadManifest,
        "max_chunks",
    );
    assert!(
        common::resident_kib(pid) < rss_before + 64 * 1024,
        "server memory grew from {rss_before} to {} KiB",
        common::resident_kib(pid)
    );

    // one agent piling up pending uploads gets `quota` past its limit
    let fds_before = common::open_fds(pid);
    for i in 0..60u32 {
        let m = manifest_for(&i.to_be_bytes(), &format!("f{i}"), 1024);
        let reply = raw.init(&m).await;
        if i < 40 {
            assert!(matches!(reply, FileReply::Status { .. }), "{reply:?}");
        } else {
            failed_with(&reply, RefusalKind::Quota, "unfinished uploads");
        }
    }
    // other agents are not affected; together they hold many uploads but few descriptors
    for a in 0..4 {
        let mut other = Raw::connect(&format!("other-{a}"), server.port).await;
        for i in 0..30u32 {
            let m = manifest_for(&(a * 100 + i).to_be_bytes(), &format!("g{i}"), 1024);
            assert!(matches!(other.init(&m).await, FileReply::Status { .. }));
        }
    }
    let fds = common::open_fds(pid);
    assert!(
        fds < fds_before + 64,
        "{} descriptors for 160 pending uploads",
        fds - fds_before
    );

    // a restart with 160 uploads in the spool and 128 descriptors in all
    server.kill();
    let log = dir.path().join("limited.log");
    let Some(_limited) = common::serve_with_nofile(&dir.path().join("server.toml"), &log, 128)
    else {
        return;
    };
    let (metrics_port, port) = (server.metrics_port, server.port);
    assert!(
        common::poll_until(Duration::from_secs(20), || {
            !scrape(metrics_port).is_empty()
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        "the server did not start with a full spool:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    drop(raw);
    let mut raw = Raw::connect("after-restart", server.port).await;
    let m = manifest_for(b"after", "f0", 1024);
    let reply = tokio::time::timeout(Duration::from_secs(15), raw.init(&m)).await;
    assert!(
        matches!(reply, Ok(FileReply::Status { .. })),
        "{reply:?}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_upload_says_where_the_file_went_and_refuses_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), LOCAL_RULES, "");
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            "server = \"mqtt://127.0.0.1:{}\"\nstate_dir = \"state\"\nid = \"cli-1\"\n\
             [metrics]\nenabled = false\n[heartbeat]\nenabled = false\n",
            server.port
        ),
    )
    .unwrap();
    let file = dir.path().join("core.dump");
    let mut bytes = vec![0u8; 300_000];
    rand::rng().fill_bytes(&mut bytes);
    fs::write(&file, &bytes).unwrap();
    let upload = |path: &Path| {
        std::process::Command::new(common::bin())
            .args(["agent", "--config", config.to_str().unwrap(), "upload"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = upload(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("landed at local: file received/cli-1/core.dump"),
        "{stdout}"
    );
    let landed = server.data().join("received/cli-1/core.dump");
    assert!(
        common::poll_until(Duration::from_secs(10), || fs::read(&landed)
            .is_ok_and(|b| b == bytes)),
        "{}",
        server.log()
    );

    let out = upload(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot upload") && stderr.contains("it is a directory"),
        "{stderr}"
    );
    assert!(!stderr.contains("invalid agent configuration"), "{stderr}");
}
