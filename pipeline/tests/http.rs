//! The HTTP sink behind the engine, against a real HTTP server in the test: a receiver that
//! hangs, fails, throttles and refuses one message. Hung and failed requests are retried, a
//! `Retry-After` is honoured, the refused message goes to the dead letter with the
//! receiver's answer, and every other record arrives once, in order.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{dispatch_records, the_dead_letter, wait_for};
use fleetbus_pipeline::{Engine, EngineOptions};
use fleetbus_rules::RuleSet;
use fleetbus_support::Publisher;

#[derive(Default)]
struct Receiver {
    /// Every request: when it came and its `Idempotency-Key`.
    requests: Vec<(Instant, Option<String>)>,
    /// The records of accepted requests, in order.
    stored: Vec<u64>,
}

async fn receive(
    State(rx): State<Arc<Mutex<Receiver>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = {
        let mut rx = rx.lock().unwrap();
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        rx.requests.push((Instant::now(), key));
        rx.requests.len()
    };
    match n {
        // hangs past the sink's timeout
        1 => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            StatusCode::OK.into_response()
        }
        2 | 3 => (StatusCode::INTERNAL_SERVER_ERROR, "database down").into_response(),
        4 => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response(),
        _ => {
            let records: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
            let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
            if seqs.contains(&13) {
                return (
                    StatusCode::BAD_REQUEST,
                    "seq 13: field `value` is not a number",
                )
                    .into_response();
            }
            rx.lock().unwrap().stored.extend(seqs);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_hangs_fails_throttles_and_refuses_gets_every_other_record_once() {
    let receiver = Arc::new(Mutex::new(Receiver::default()));
    let app = axum::Router::new()
        .route("/ingest", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let rules = format!(
        r#"
[sinks.hook]
type = "http"
url = "http://{addr}/ingest"
timeout = "300ms"
dead_letter = "dlq"
batch.max_events = 5
batch.retry_backoff = "10ms"
batch.retry_backoff_max = "20ms"

[sinks.dlq]
type = "file"
path = "dead/{{agent}}.jsonl"

[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["hook"]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let set = RuleSet::parse(Path::new("rules.toml"), &rules).unwrap();
    let engine = Engine::start(
        set,
        dir.path(),
        EngineOptions::default(),
        Publisher::discard(),
    )
    .await
    .unwrap();
    dispatch_records(&engine, 1..=40);
    wait_for(
        &engine,
        Duration::from_secs(30),
        "the receiver and the dead letter",
        |s| s.written("hook") == 39 && s.written("dlq") == 1,
    )
    .await;
    engine.shutdown(Duration::from_secs(5)).await;
    server.abort();

    let rx = receiver.lock().unwrap();
    let expected: Vec<u64> = (1..=40).filter(|&s| s != 13).collect();
    assert_eq!(rx.stored, expected, "every other record once, in order");
    // the throttled request's successor waited for Retry-After (the backoff is 10-20 ms)
    let waited = rx.requests[4].0 - rx.requests[3].0;
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    // a batch sent again carries the same key
    assert!(rx
        .requests
        .iter()
        .all(|(_, k)| k.as_ref().is_some_and(|k| k.len() == 32)));
    assert_eq!(
        rx.requests[0].1, rx.requests[4].1,
        "the first batch, sent again"
    );
    let error = the_dead_letter(dir.path(), 13, "hook");
    assert!(error.contains("400 Bad Request"), "{error}");
    assert!(error.contains("is not a number"), "{error}");
}

/// Each request body the receiver was sent, as text.
type Bodies = Arc<Mutex<Vec<String>>>;

async fn keep_body(State(bodies): State<Bodies>, body: Bytes) -> StatusCode {
    bodies
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    StatusCode::NO_CONTENT
}

/// Runs an engine over `dir` whose sink `hook` posts everything to `url` in batches of 3,
/// dispatches `messages` (topic, payload), and stops it once `hook` has written
/// `written` messages. Returns the log's end.
async fn post_through_engine(
    url: &str,
    dir: &Path,
    messages: &[(&str, Vec<u8>)],
    written: u64,
) -> u64 {
    let rules = format!(
        "[sinks.hook]\ntype = \"http\"\nurl = \"{url}\"\nbatch.max_events = 3\n\n\
         [[rules]]\nname = \"all\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"hook\"]\n"
    );
    let set = RuleSet::parse(Path::new("rules.toml"), &rules).unwrap();
    let engine = Engine::start(set, dir, EngineOptions::default(), Publisher::discard())
        .await
        .unwrap();
    for (topic, payload) in messages {
        engine.dispatch(topic, payload);
    }
    wait_for(&engine, Duration::from_secs(20), "the delivery", |s| {
        s.written("hook") == written
    })
    .await;
    let end = engine.durable();
    engine.shutdown(Duration::from_secs(5)).await;
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_is_the_record_as_published_whether_read_from_memory_or_from_disk() {
    let bodies = Bodies::default();
    let app = axum::Router::new()
        .route("/in", axum::routing::post(keep_body))
        .with_state(bodies.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/in", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // agents publish MessagePack; a third party JSON, with a field claiming another agent
    let mut published = Vec::new();
    for seq in 1..=4u64 {
        let ts = chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(1_800_000_000);
        let mut record = fleetbus_protocol::Record::new("web-01", "metrics", seq, ts);
        record.epoch = Some(9);
        record.metrics.push(fleetbus_protocol::Metric::new(
            "cpu",
            seq as f64 / 4.0,
            Some("%"),
        ));
        record
            .fields
            .insert("note".into(), serde_json::json!("a \"quoted\" é\n"));
        published.push(("fleet/web-01/telemetry/metrics", record.encode().unwrap()));
    }
    let third_party =
        br#"{"zone":"b","seq":1,"agent":"db-09","nested":{"y":[1,2.5,null],"x":true}}"#;
    published.push(("fleet/web-02/telemetry/app", third_party.to_vec()));

    let dir = tempfile::tempdir().unwrap();
    let end = post_through_engine(&url, dir.path(), &published, 5).await;
    let live: Vec<String> = std::mem::take(&mut *bodies.lock().unwrap());
    // saved after the last batch: a restart would send nothing again
    let position = dir.path().join("wal/sinks/hook.pos");
    assert_eq!(std::fs::read_to_string(&position).unwrap(), end.to_string());

    // forget the sink's position: a new engine reads the whole log from disk and sends it
    // again
    std::fs::remove_file(&position).unwrap();
    post_through_engine(&url, dir.path(), &[], 5).await;
    server.abort();
    let replayed: Vec<String> = std::mem::take(&mut *bodies.lock().unwrap());
    assert_eq!(live, replayed, "the same bytes from memory and from disk");

    let records: Vec<String> = live
        .iter()
        .flat_map(|body| serde_json::from_str::<Vec<serde_json::Value>>(body).unwrap())
        .map(|r| r.to_string())
        .collect();
    assert_eq!(records.len(), 5);
    // each is the body the rules engine decodes (agent and stream from the topic)
    for (topic, payload) in &published {
        let decoded = fleetbus_protocol::Message::decode(topic, payload)
            .unwrap()
            .body;
        assert!(
            records.contains(&decoded.to_string()),
            "{decoded} not among {records:?}"
        );
    }
    // in the publisher's order, the topic's identity first, minified
    assert!(
        live.last().unwrap().ends_with(
            r#"{"agent":"web-02","stream":"app","zone":"b","seq":1,"nested":{"y":[1,2.5,null],"x":true}}]"#
        ),
        "{live:?}"
    );
    assert!(
        live[0].starts_with(r#"[{"agent":"web-01","stream":"metrics","seq":1,"ts":"#),
        "{live:?}"
    );
}
