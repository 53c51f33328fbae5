//! The HTTP sink with a templated URL against a real HTTP server in the test: a batch of
//! two agents' records goes out as one request per agent's URL, each with its own
//! messages, in order, and its own `Idempotency-Key`; a refused request is named.

use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use fleetbus_protocol::Message;
use fleetbus_sinks::{Batch, ErrorClass, Item, SinkConfig, SinkPlace};

/// (agent in the path, idempotency key, body) of each request.
type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

async fn receive(
    State(seen): State<Seen>,
    UrlPath(agent): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    if agent == "refuse-me" {
        return StatusCode::BAD_REQUEST;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    seen.lock().unwrap().push((agent, key, body));
    StatusCode::OK
}

fn item(index: u64, agent: &str, seq: u64) -> Item {
    let body = format!(r#"{{"seq":{seq},"epoch":1}}"#);
    Item::new(
        index,
        Message::decode(&format!("fleet/{agent}/telemetry/m"), body.as_bytes()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_goes_out_as_one_request_per_rendered_url() {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/in/:agent", axum::routing::post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let config: SinkConfig = toml::from_str(&format!(
        "type = \"http\"\nurl = \"http://127.0.0.1:{port}/in/{{agent}}\"\n"
    ))
    .unwrap();
    let mut sink = config
        .build(&SinkPlace::in_dir("hook", dir.path()))
        .unwrap();
    let batch = Batch {
        first: 1,
        next: 5,
        items: vec![
            item(1, "a", 1),
            item(2, "b", 1),
            item(3, "a", 2),
            item(4, "b", 2),
        ],
    };
    sink.write(&batch).await.unwrap();
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:#?}");
    for ((agent, key, body), want) in got.iter().zip(["a", "b"]) {
        assert_eq!(agent, want);
        let seqs: Vec<(String, u64)> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["agent"].as_str().unwrap().to_string(),
                    m["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(seqs, [(want.to_string(), 1), (want.to_string(), 2)]);
        assert_eq!(key.len(), 32);
    }
    assert_ne!(got[0].1, got[1].1, "each request has its own key");

    // the same batch again: the same keys, so a receiver can drop what it has
    sink.write(&batch).await.unwrap();
    let again = seen.lock().unwrap().clone();
    assert_eq!(again[2].1, got[0].1);
    assert_eq!(again[3].1, got[1].1);

    // a URL whose request is refused: a permanent error naming it
    let refused = Batch {
        first: 9,
        next: 10,
        items: vec![item(9, "refuse-me", 1)],
    };
    let e = sink.write(&refused).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.to_string().contains("/in/refuse-me: 400"), "{e}");
}

#[test]
fn a_placeholder_in_the_host_is_refused() {
    let config: SinkConfig =
        toml::from_str("type = \"http\"\nurl = \"http://{agent}.example.com/in\"\n").unwrap();
    let problems = fleetbus_config::problems_of(&config);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .to_string()
            .contains("not in the scheme or host"),
        "{}",
        problems[0]
    );
    let config: SinkConfig =
        toml::from_str("type = \"http\"\nurl = \"http://example.com/in/{nope}\"\n").unwrap();
    let problems = fleetbus_config::problems_of(&config);
    assert!(problems[0].to_string().contains("nope"), "{}", problems[0]);
}
