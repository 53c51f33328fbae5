//! The InfluxDB sink's 2.x write API (`/api/v2/write`) against an HTTP server in the test
//! that answers as InfluxDB 2 does (Debian has no InfluxDB 2; the 1.x API is tested
//! against a real `influxd` in `pipeline/tests/influxdb.rs`): org, bucket and precision in
//! the query, the token in `Authorization`, the points as the body; 401 retried, 400
//! refused for good.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, Uri};
use fleetbus_protocol::Message;
use fleetbus_sinks::{Batch, ErrorClass, Item, SinkConfig, SinkPlace};

/// What the server got: path and query, `Authorization`, body.
type Requests = Arc<Mutex<Vec<(String, String, String)>>>;

#[tokio::test]
async fn points_go_to_the_bucket_with_the_token_and_answers_are_classified() {
    let requests = Requests::default();
    let status = Arc::new(AtomicU16::new(204));
    let (seen, answer) = (requests.clone(), status.clone());
    let app = axum::Router::new().route(
        "/api/v2/write",
        axum::routing::post(move |uri: Uri, headers: HeaderMap, body: String| {
            let (seen, answer) = (seen.clone(), answer.clone());
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                seen.lock().unwrap().push((uri.to_string(), auth, body));
                let code = StatusCode::from_u16(answer.load(Ordering::SeqCst)).unwrap();
                (code, r#"{"code":"invalid","message":"as told"}"#)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let config: SinkConfig = toml::from_str(&format!(
        "type = \"influxdb\"\nurl = \"http://{addr}\"\norg = \"ops\"\nbucket = \"fleet\"\n\
         token = {{ file = \"{}\" }}\nmeasurement = \"fleet_{{metric}}\"\n",
        token.display()
    ))
    .unwrap();
    let mut sink = config
        .build(&SinkPlace::in_dir("influx", dir.path()))
        .unwrap();
    let message = Message::decode(
        "fleet/web-01/telemetry/metrics",
        br#"{"seq":1,"ts":"2026-12-01T10:00:00Z","metrics":[{"name":"load.1","value":0.5}]}"#,
    )
    .unwrap();
    let batch = Batch {
        first: 1,
        next: 2,
        items: vec![Item::new(1, message)],
    };
    sink.write(&batch).await.unwrap();
    assert_eq!(
        requests.lock().unwrap().clone(),
        [(
            "/api/v2/write?org=ops&bucket=fleet&precision=ns".to_string(),
            "Token s3cret-token".to_string(),
            "fleet_load.1,agent=web-01,stream=metrics value=0.5 1796119200000000000\n".to_string()
        )]
    );

    // a token the server does not take: the operator can fix it, so it is retried
    status.store(401, Ordering::SeqCst);
    let e = sink.write(&batch).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    assert!(e.to_string().contains("401 Unauthorized"), "{e}");
    // points the server cannot take: refused for good, with its answer
    status.store(400, Ordering::SeqCst);
    let e = sink.write(&batch).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.to_string().contains("as told"), "{e}");
    server.abort();
}
