//! End to end: what one client, one credential or one bad message could do to everyone
//! else, tried against a real `fleetbus serve` process over real sockets. Each test
//! reproduces an attack or a fault and checks that it held: honest agents keep being
//! ingested, nothing acknowledged is lost, the bad actor gets a clear refusal.

mod common;

use std::fs;
use std::time::Duration;

use common::secured::{
    bootstrap_agent_config, connect, connect_result, connected, disconnected, options,
    publish_records, refused_with, rules_worker, Secured,
};
use common::{free_port, poll_until, Proc};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};

/// A bootstrap login (credential `provision`) asking for client id `id`.
fn bootstrap_login(port: u16, id: &str, token: &str) -> MqttOptions {
    let mut o = options(port, id, None);
    o.set_credentials("provision", token);
    o
}

/// One enrollment exchange as an agent makes it; the server's answer (JSON).
async fn enroll_over_mqtt(port: u16, id: &str, bootstrap: &str) -> serde_json::Value {
    let (client, mut events) = AsyncClient::new(bootstrap_login(port, id, bootstrap), 16);
    let reply = format!("fleet/enroll/{id}/reply");
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&reply, QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let key = "00".repeat(32); // a public key (its secret is unknown here)
                    let request = serde_json::json!({ "agent": id, "reply_key": key }).to_string();
                    client
                        .publish(
                            format!("fleet/enroll/{id}/request"),
                            QoS::AtLeastOnce,
                            false,
                            request,
                        )
                        .await
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == reply => {
                    return serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap();
                }
                Ok(_) => {}
                Err(e) => panic!("{id}: enrollment connection failed: {e:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: no enrollment answer"));
    let _ = client.disconnect().await;
    answer
}

/// Finding 1: a client asking for the client id of the server's in-process rules engine
/// link used to take it over, and ingestion stopped until a restart. Refused with CONNACK
/// 2 and a `refused` event, with security off and with a bootstrap token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_client_id_cannot_be_taken_from_the_network() {
    for enforce in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let server = Secured::start_with(dir.path(), enforce, "");
        let port = server.port;
        let token = enforce.then(|| server.enroll("web-01", &[]));
        let boot = enforce.then(|| server.enroll("provision", &["--role", "bootstrap"]));
        tokio::time::sleep(Duration::from_millis(700)).await; // the server reloads the store
        let attempt = match &boot {
            Some(boot) => {
                common::first_connect_outcome(bootstrap_login(port, "fleetbus-rules-engine", boot))
                    .await
            }
            None => connect_result(port, "fleetbus-rules-engine", None).await,
        };
        refused_with(attempt, ConnectReturnCode::BadClientId);
        server.wait_event("refused", |e| {
            e["client_id"] == "fleetbus-rules-engine"
                && e["code"] == 2
                && e["reason"].as_str().unwrap().contains("reserved")
        });
        // the engine still ingests
        publish_records(port, "web-01", token.as_deref(), "app", 1..=5).await;
        server.wait_records("web-01", "app", 5);
    }
}

/// Finding 2: when rumqttd's router refused a link (here: `max_connections` reached), a
/// stale will handler stayed behind; the next CONNECT with the same id panicked while
/// holding a mutex and every later connection panicked on the poisoned lock. Now the
/// refusal is a CONNACK 3 and the broker keeps serving everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_refusal_cannot_poison_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    // the rules engine's link takes one of the four slots
    let server = Secured::start_with(dir.path(), false, "max_connections = 4\n");
    let port = server.port;
    let mut held = Vec::new();
    for id in ["a", "b", "c"] {
        let (client, mut events) = connected(options(port, id, None)).await;
        // keep the connection served in the background
        let task = tokio::spawn(async move { while events.poll().await.is_ok() {} });
        held.push((client, task));
    }
    // the same refused id twice: the second used to panic and poison the broker
    for _ in 0..3 {
        refused_with(
            connect_result(port, "d", None).await,
            ConnectReturnCode::ServiceUnavailable,
        );
    }
    // a slot frees up: new clients are served, the broker is not poisoned
    let (client, task) = held.remove(0);
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    let mut connected = false;
    for _ in 0..20 {
        if connect_result(port, "e", None).await.is_ok() {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        connected,
        "nobody can connect any more\n{}",
        server.proc.log()
    );
    publish_records(port, "e", None, "app", 1..=3).await;
    server.wait_records("e", "app", 3);
    assert!(
        !server.proc.log().contains("panicked"),
        "{}",
        server.proc.log()
    );
}

/// Finding 3: one bootstrap token held ~200 connections and locked agents out, and enrolled
/// 3,500 ids in 11 s. Bootstrap connections are capped and short-lived, enrollments are
/// rate-limited per bootstrap credential, and enrolled agents still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_cannot_hold_the_broker_or_enroll_without_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start_with(
        dir.path(),
        true,
        "[broker.limits]\nbootstrap_connections = 3\nbootstrap_lifetime = \"2s\"\n\
         enrollments_per_minute = 2\n",
    );
    let port = server.port;
    let boot = server.enroll("provision", &["--role", "bootstrap", "--groups", "edge"]);
    let agent = server.enroll("web-01", &[]);
    tokio::time::sleep(Duration::from_millis(700)).await; // the server reloads the store
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(connected(bootstrap_login(port, &format!("new-{i}"), &boot)).await);
    }
    // a fourth is refused: the broker is busy for bootstrap logins
    refused_with(
        common::first_connect_outcome(bootstrap_login(port, "new-3", &boot)).await,
        ConnectReturnCode::ServiceUnavailable,
    );
    server.wait_event("refused", |e| {
        e["client_id"] == "new-3" && e["reason"].as_str().unwrap().contains("bootstrap")
    });
    // an enrolled agent is not affected
    publish_records(port, "web-01", Some(&agent), "app", 1..=3).await;
    server.wait_records("web-01", "app", 3);
    // the bootstrap connections are dropped once their lifetime is over
    for (_, events) in held.iter_mut() {
        assert!(
            disconnected(events, Duration::from_secs(6)).await,
            "a bootstrap connection outlived limits.bootstrap_lifetime"
        );
    }
    server.wait_event("disconnected", |e| {
        e["reason"].as_str().unwrap().contains("lifetime")
    });
    // two enrollments a minute: the third is refused and says why
    for id in ["edge-1", "edge-2"] {
        let answer = enroll_over_mqtt(port, id, &boot).await;
        assert_eq!(answer["outcome"], "enrolled", "{answer}");
    }
    let answer = enroll_over_mqtt(port, "edge-3", &boot).await;
    assert_eq!(answer["outcome"], "refused", "{answer}");
    assert!(
        answer["reason"].as_str().unwrap().contains("rate limit"),
        "{answer}"
    );
    let listing = server.agents(&["credentials"]);
    assert!(!listing.contains("edge-3"), "{listing}");
}

/// Finding 10: a bootstrap token re-enrolled a revoked id and got a fresh credential. A
/// revoked id stays revoked until an operator enrolls it again with `--replace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_id_cannot_be_reenrolled_with_a_bootstrap_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let port = server.port;
    let boot = server.enroll("provision", &["--role", "bootstrap", "--groups", "edge"]);
    server.enroll("stolen-1", &["--groups", "edge"]);
    server.agents(&["revoke", "stolen-1"]);
    tokio::time::sleep(Duration::from_millis(700)).await; // the server reloads the store
    refused_with(
        common::first_connect_outcome(bootstrap_login(port, "stolen-1", &boot)).await,
        ConnectReturnCode::NotAuthorized,
    );
    server.wait_event("refused", |e| {
        e["client_id"] == "stolen-1" && e["reason"] == "credential revoked"
    });
    // the operator's CLI says the same without --replace, and re-enrolls with it
    let out = std::process::Command::new(common::bin())
        .args(["agents", "enroll", "stolen-1", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("revoked") && err.contains("--replace"),
        "{err}"
    );
    let token = server.enroll("stolen-1", &["--replace"]);
    let (_client, _events) = connect(port, "stolen-1", &token).await;
}

/// Finding 16: two servers on one data directory both ran and garbled the file sink's
/// batch marker; the next start refused to run with acknowledged records stranded. The
/// second server is refused now, and a garbled marker no longer stops a start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_per_data_dir_and_a_garbled_marker_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Secured::start_with(dir.path(), false, "");
    publish_records(server.port, "a1", None, "app", 1..=20).await;
    server.wait_records("a1", "app", 20);

    // a second server on the same data_dir (another port) does not start
    let other = dir.path().join("second.toml");
    fs::write(
        &other,
        format!(
            "data_dir = \"data\"\n{}[rules]\nfile = \"rules.toml\"\n[broker]\nlisten = \"127.0.0.1:{}\"\n",
            common::admin_table(),
            free_port()
        ),
    )
    .unwrap();
    let mut second = Proc::start(
        &["serve", "--config", other.to_str().unwrap()],
        &dir.path().join("second.log"),
    );
    assert!(
        poll_until(Duration::from_secs(10), || !second.running()),
        "a second server runs on the same data_dir"
    );
    assert!(!second.child.wait().unwrap().success());
    let log = second.log_text();
    assert!(
        log.contains("fleetbus.lock") && log.contains("locked"),
        "{log}"
    );

    // garbled marker: the next start sets it aside and loses nothing
    server.proc.terminate();
    let marker = dir.path().join("data/wal/sinks/records.marker");
    assert!(marker.is_file());
    fs::write(&marker, b"\x00\x01 not json").unwrap();
    server.proc.launch();
    publish_records(server.port, "a1", None, "app", 21..=30).await;
    server.wait_records("a1", "app", 30);
    let mut seqs: Vec<u64> = server
        .records("a1", "app")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    assert!(server
        .proc
        .log()
        .contains("unreadable batch marker set aside"));
}

/// A raw TCP connection that sends nothing (or a few bytes): what an idle or slow-loris
/// client holds.
fn hold(port: u16, first_bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(first_bytes).unwrap();
    s
}

/// True when the server closed `stream` within `within` (a read sees EOF or a reset).
fn closed_by_server(stream: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 or the like before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with `headers` (each `Name: value`) and
/// `body`; the status code and the whole answer.
fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for h in headers {
        head.push_str(&format!("{h}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    (status, text)
}

/// `GET path` on 127.0.0.1:`port` with `headers`: the whole answer, which must be a 200.
fn http_get_with(port: u16, path: &str, headers: &[&str]) -> String {
    let (status, text) = http_request(port, "GET", path, headers, b"");
    assert_eq!(status, 200, "{text}");
    text
}

/// `GET path` on 127.0.0.1:`port`: the whole answer, which must be a 200.
fn http_get(port: u16, path: &str) -> String {
    http_get_with(port, path, &[])
}

/// The value of metric `name` (no labels) in a Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Finding 4: idle and slow-loris connections to the HTTP endpoints were never closed.
/// Now each endpoint serves a bounded number of connections, closes one more at once, and
/// ends idle and slow connections after `http.header_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_http_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let server = Secured::start_with(
        dir.path(),
        false,
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [http]\nmax_connections = 8\nheader_timeout = \"1s\"\nconnection_lifetime = \"3s\"\n"
        ),
    );
    // 4 idle connections and 4 that dribble a request header
    let mut held: Vec<std::net::TcpStream> = (0..4).map(|_| hold(metrics_port, b"")).collect();
    for _ in 0..4 {
        held.push(hold(metrics_port, b"GET /metrics HTTP/1.1\r\nX-Slow: "));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // a ninth is closed at once
    let mut ninth = hold(metrics_port, b"");
    assert!(closed_by_server(&mut ninth, Duration::from_millis(800)));
    // the slow ones keep sending, one byte at a time: still cut off by the header timeout
    let started = std::time::Instant::now();
    for s in held.iter_mut() {
        use std::io::Write;
        let _ = s.write_all(b"a");
        assert!(
            closed_by_server(s, Duration::from_secs(4)),
            "an idle or slow connection was kept"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    // honest requests are served again, and the counters say what happened
    let text = http_get(metrics_port, "/metrics");
    assert!(
        metric(&text, "fleetbus_http_timed_out_total") >= 8,
        "{text}"
    );
    assert!(
        metric(&text, "fleetbus_http_refused_connections_total") >= 1,
        "{text}"
    );
    publish_records(server.port, "a1", None, "app", 1..=3).await;
    server.wait_records("a1", "app", 3);
}

/// Finding 4, the other half: out of file descriptors, the MQTT accept loop spun and logged
/// 5 million lines in 10 s. It pauses now, logs a few lines, counts the pauses, and serves
/// again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_pauses_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    fs::write(
        dir.path().join("server.toml"),
        format!(
            "data_dir = \"data\"\n{}[broker]\nlisten = \"127.0.0.1:{port}\"\nconnect_timeout = \"30s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            common::admin_table()
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let Some(mut server) = common::serve_with_nofile(&dir.path().join("server.toml"), &log, 128)
    else {
        return;
    };
    assert!(poll_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", metrics_port)).is_ok()
    }));
    // hold more connections than the server has descriptors
    let mut held = Vec::new();
    for _ in 0..200 {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = server.log_text();
    let lines = text.lines().filter(|l| l.contains("accept failed")).count();
    assert!(lines >= 1, "never ran out of descriptors?\n{text}");
    assert!(lines <= 5, "{lines} accept failures logged in 3 s");
    drop(held);
    // descriptors free again: agents are served
    publish_records(port, "a1", None, "app", 1..=3).await;
    let text = http_get(metrics_port, "/metrics");
    assert!(
        metric(&text, "fleetbus_accept_backoffs_total") >= 1,
        "{text}"
    );
    assert!(
        metric(&text, "fleetbus_messages_received_total") >= 3,
        "{text}"
    );
    server.terminate(Duration::from_secs(10));
}

/// A server (security `enforce` or not) with a job signing key, an admin endpoint and
/// `extra` configuration; the server and its admin port.
fn with_jobs(dir: &std::path::Path, enforce: bool, extra: &str) -> (Secured, u16) {
    let keys = dir.join("keys");
    common::run_ok(std::process::Command::new(common::bin()).args([
        "keys",
        "generate",
        "--out",
        keys.to_str().unwrap(),
    ]));
    let admin = free_port();
    let server = Secured::start_with(
        dir,
        enforce,
        &format!(
            "[jobs]\nsigning_key = \"keys/job-signing.key\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{extra}"
        ),
    );
    (server, admin)
}

/// A presence (birth) message as an agent sends it, naming `agent` with `groups`.
fn birth(agent: &str, groups: &[&str]) -> Vec<u8> {
    serde_json::json!({
        "agent": agent,
        "status": "online",
        "ts": "2026-12-01T00:00:00Z",
        "groups": groups,
    })
    .to_string()
    .into_bytes()
}

/// The agents the job service knows in `group` (`GET /agents?group=` with `operator`, an
/// `Authorization` header).
fn members(admin_port: u16, operator: &str, group: &str) -> Vec<String> {
    let text = http_get_with(admin_port, &format!("/agents?group={group}"), &[operator]);
    let body = &text[text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0)..];
    let body = body.trim();
    // chunked encoding: take the JSON array between the first '[' and the last ']'
    let json = &body[body.find('[').unwrap_or(0)..=body.rfind(']').unwrap_or(0)];
    let agents: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    agents
        .iter()
        .map(|a| a["agent"].as_str().unwrap().to_string())
        .collect()
}

/// Finding 9: an agent published a birth message naming another agent on its own
/// presence topic; the server took the payload's id over the topic's and moved the victim
/// into the rogue's group. The topic's agent is the only identity now, and nobody but the
/// server leaves retained messages under `fleet/` (a will included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_message_cannot_speak_for_another_agent_or_stay_retained() {
    let dir = tempfile::tempdir().unwrap();
    let (server, admin_port) = with_jobs(dir.path(), true, "");
    let port = server.port;
    let operator = format!(
        "Authorization: Bearer {}",
        server.enroll("ops", &["--role", "operator"])
    );
    let members = |group: &str| members(admin_port, &operator, group);
    let victim = server.enroll("web-01", &["--groups", "web"]);
    let rogue = server.enroll("db-01", &["--groups", "db"]);
    let (v, mut v_events) = connect(port, "web-01", &victim).await;
    v.publish(
        "fleet/web-01/presence",
        QoS::AtLeastOnce,
        false,
        birth("web-01", &["web"]),
    )
    .await
    .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while v_events.poll().await.is_ok() {}
    })
    .await;
    assert!(
        poll_until(Duration::from_secs(5), || members("web") == ["web-01"]),
        "{:?}",
        members("web")
    );
    // the rogue speaks for the victim on its own presence topic
    let (r, mut r_events) = connect(port, "db-01", &rogue).await;
    r.publish(
        "fleet/db-01/presence",
        QoS::AtLeastOnce,
        false,
        birth("web-01", &["db"]),
    )
    .await
    .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while r_events.poll().await.is_ok() {}
    })
    .await;
    server.wait_event("violation", |e| {
        e["client_id"] == "db-01" && e["reason"].as_str().unwrap().contains("web-01")
    });
    assert_eq!(members("web"), ["web-01"]);
    assert!(members("db").is_empty(), "{:?}", members("db"));

    // a retained presence is a violation: the connection ends
    r.publish(
        "fleet/db-01/presence",
        QoS::AtLeastOnce,
        true,
        birth("db-01", &["db"]),
    )
    .await
    .unwrap();
    assert!(disconnected(&mut r_events, Duration::from_secs(5)).await);
    server.wait_event("violation", |e| {
        e["client_id"] == "db-01" && e["reason"].as_str().unwrap().contains("retained")
    });
    // and so is a retained last will, or a will on another agent's topic: refused at CONNECT
    for (topic, retain) in [
        ("fleet/db-01/presence", true),
        ("fleet/web-01/presence", false),
    ] {
        let mut o = options(port, "db-01", Some(&rogue));
        o.set_last_will(rumqttc::LastWill::new(
            topic,
            birth("db-01", &[]),
            QoS::AtLeastOnce,
            retain,
        ));
        refused_with(
            common::first_connect_outcome(o).await,
            ConnectReturnCode::NotAuthorized,
        );
    }
    server.wait_event("refused", |e| {
        e["client_id"] == "db-01" && e["reason"].as_str().unwrap().contains("last will")
    });
    drop(v);
}

/// Finding 11: the admin endpoint was unauthenticated, so any local process (or a web page
/// by DNS rebinding) could push a job the server signs. Every call needs an operator
/// token now, the `Host` must be the endpoint's, state changes need a JSON body, and
/// bodies are bounded; refusals are security events. Without enforcement the broker
/// listens on loopback only unless told `allow_insecure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_needs_an_operator_and_the_broker_is_loopback_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (server, admin) = with_jobs(dir.path(), false, "[http]\nmax_body_bytes = 4096\n");
    let operator = server.enroll("ops", &["--role", "operator"]);
    let agent = server.enroll("web-01", &[]);
    server.enroll("old-ops", &["--role", "operator"]);
    let old = server.enroll("old-ops", &["--role", "operator", "--replace"]);
    server.agents(&["revoke", "old-ops"]);
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let json = "Content-Type: application/json";
    let push = br#"{"target":{"group":"web"},"operation":"echo","args":{},"timeout_secs":30,"allow_empty":true}"#;

    let refused: [(&str, Vec<String>, &[u8], u16); 6] = [
        ("no token", vec![json.into()], push, 401),
        (
            "an agent's token",
            vec![json.into(), bearer(&agent)],
            push,
            403,
        ),
        (
            "a revoked operator",
            vec![json.into(), bearer(&old)],
            push,
            401,
        ),
        (
            "a wrong token",
            vec![json.into(), bearer("00ff")],
            push,
            401,
        ),
        (
            "a foreign Host (DNS rebinding)",
            vec![
                json.into(),
                bearer(&operator),
                format!("Host: evil.example:{admin}"),
            ],
            push,
            421,
        ),
        (
            "a form POST (cross-site)",
            vec![
                "Content-Type: application/x-www-form-urlencoded".into(),
                bearer(&operator),
            ],
            b"target=x",
            415,
        ),
    ];
    for (what, headers, body, want) in refused {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, text) = http_request(admin, "POST", "/jobs", &headers, body);
        assert_eq!(status, want, "{what}: {text}");
    }
    // a body past http.max_body_bytes
    let big = vec![b'x'; 10_000];
    let (status, _) = http_request(admin, "POST", "/jobs", &[json, &bearer(&operator)], &big);
    assert_eq!(status, 413);
    // nothing was pushed; the operator sees that, and may push
    let text = http_get_with(admin, "/jobs", &[&bearer(&operator)]);
    assert!(
        text.trim_end().ends_with("[]") || text.contains("[]"),
        "{text}"
    );
    let (status, text) = http_request(admin, "POST", "/jobs", &[json, &bearer(&operator)], push);
    assert_eq!(status, 201, "{text}");
    // the last refusal's event is there, and so are the others before it
    server.wait_event("admin-refused", |e| e["status"] == 415);
    let events = server.events("admin-refused");
    assert!(
        events
            .iter()
            .any(|e| e["status"] == 421 && e["reason"].as_str().unwrap().contains("evil.example")),
        "{events:?}"
    );
    assert!(events.len() >= 6, "{events:?}");

    // the CLI reads the token from a file or FLEETBUS_ADMIN_TOKEN
    let token_file = dir.path().join("ops.token");
    fs::write(&token_file, &operator).unwrap();
    let url = format!("http://127.0.0.1:{admin}");
    let listed = common::run_ok(std::process::Command::new(common::bin()).args([
        "job",
        "list",
        "--admin",
        &url,
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ]));
    assert!(listed.contains("echo"), "{listed}");
    let out = std::process::Command::new(common::bin())
        .args(["job", "list", "--admin", &url])
        .env_remove("FLEETBUS_ADMIN_TOKEN")
        .env_remove("FLEETBUS_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token-file"));
    let listed = common::run_ok(
        std::process::Command::new(common::bin())
            .args(["job", "list", "--admin", &url])
            .env("FLEETBUS_ADMIN_TOKEN", &operator),
    );
    assert!(listed.contains("echo"), "{listed}");

    // the broker beyond loopback without enforcement: refused at start
    let open = dir.path().join("open.toml");
    fs::write(
        &open,
        format!(
            "data_dir = \"open-data\"\n{}[broker]\nlisten = \"0.0.0.0:{}\"\n",
            common::admin_table(),
            free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--config", open.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allow_insecure") && err.contains("enforce"),
        "{err}"
    );
}

/// Finding 8: one message that can never be written (a 300-character stream name, a path
/// too long for the filesystem, a forged file completion) used to fail its sink on every
/// retry, across restarts: the sink stalled, its backlog filled, and records for it were
/// refused until agents dropped theirs. Now such a message goes alone to the dead-letter
/// sink at once, and everything behind it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_can_never_be_written_goes_to_a_dead_letter_and_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start_with_rules(
        dir.path(),
        false,
        "",
        // a template that two 128-character names overflow (ENAMETOOLONG), and a rule that
        // would store forged completions
        "[sinks.pairs]\ntype = \"file\"\npath = \"pairs/{stream}-{stream}.jsonl\"\n\
         [sinks.uploads]\ntype = \"file\"\npath = \"uploads/{agent}/{file.name}\"\n\
         [[rules]]\nname = \"pairs\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"pairs\"]\n\
         [[rules]]\nname = \"uploads\"\nfrom = [\"fleet/+/files/+/complete\"]\nto = [\"uploads\"]\n",
    );
    let port = server.port;
    let long_valid = "s".repeat(128); // a valid id, but twice too long for one file name
    let too_long = "x".repeat(300); // not a valid stream name at all
    publish_records(port, "a1", None, &too_long, 1..=1).await;
    publish_records(port, "a1", None, &long_valid, 1..=2).await;
    // a forged completion pointing at a spool file that does not exist, and a forged event
    let (client, mut events) = connected(options(port, "a1", None)).await;
    let forged = serde_json::json!({
        "file": {"id": "f1", "name": "x", "size": 3, "sha256": "00", "chunk_size": 3, "chunks": 1},
        "spool": "a1/f1/data"
    });
    client
        .publish(
            "fleet/a1/files/f1/complete",
            QoS::AtLeastOnce,
            false,
            forged.to_string(),
        )
        .await
        .unwrap();
    client
        .publish(
            "fleet/server/security/refused",
            QoS::AtLeastOnce,
            false,
            r#"{"event":"refused","client_id":"forged"}"#,
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    // what comes after is written, by every sink
    publish_records(port, "a1", None, "app", 1..=50).await;
    server.wait_records("a1", "app", 50);
    assert!(
        poll_until(Duration::from_secs(10), || {
            fs::read_to_string(dir.path().join("data/pairs/app-app.jsonl"))
                .map(|t| t.lines().count() == 50)
                .unwrap_or(false)
        }),
        "the pairs sink stalled\n{}",
        server.proc.log()
    );
    server.wait_records("a1", &long_valid, 2);
    // the impossible ones are in the built-in dead-letter sink, each with its reason
    assert!(
        poll_until(Duration::from_secs(10), || server.dead_letters().len() >= 3),
        "{:?}\n{}",
        server.dead_letters(),
        server.proc.log()
    );
    let dead = server.dead_letters();
    let from = |sink: &str| {
        dead.iter()
            .filter(|d| d["dead_letter"]["sink"] == sink)
            .count()
    };
    assert_eq!(from("ingest"), 1, "{dead:?}");
    assert_eq!(from("pairs"), 2, "{dead:?}");
    assert!(dead.iter().any(|d| d["dead_letter"]["error"]
        .as_str()
        .unwrap()
        .contains("File name too long")));
    // the forged messages reached no sink
    assert!(!dir.path().join("data/uploads").exists());
    assert!(server
        .events("refused")
        .iter()
        .all(|e| e["client_id"] != "forged"));
    let metrics_free = server.proc.log();
    assert!(
        !metrics_free.contains("retrying"),
        "a sink retried a message it can never write\n{metrics_free}"
    );
}

/// Finding 15: a `fleetbus rules run` worker on the same broker as `serve` acknowledged
/// records too, and agents deleted a record on whichever acknowledgement came first:
/// records only the worker stored were missing from the server's sinks. Acknowledgements
/// name their store now, and an agent removes a record only on its own store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_deletes_a_record_only_when_its_own_store_has_it() {
    let dir = tempfile::tempdir().unwrap();
    // the server's `held` sink takes heartbeats and is blocked: once 1 MiB waits for it,
    // the server refuses further heartbeats (and does not acknowledge them)
    let server = Secured::start_with_rules(
        dir.path(),
        false,
        "",
        "[sinks.held]\ntype = \"file\"\npath = \"held/{agent}/{stream}.jsonl\"\nbuffer.max_bytes = 1048576\n\
         [[rules]]\nname = \"held\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [\"held\"]\n",
    );
    let blocker = dir.path().join("data/held");
    fs::write(&blocker, "a file where the sink needs a directory").unwrap();
    let port = server.port;
    let (filler, mut events) = connected(options(port, "filler", None)).await;
    let pad = "x".repeat(100_000);
    for seq in 1..=12 {
        let body = format!(r#"{{"seq":{seq},"epoch":1,"pad":"{pad}"}}"#);
        filler
            .publish(
                "fleet/filler/telemetry/heartbeat",
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;

    // a worker archiving heartbeats from the same broker, with its own store
    let (worker, worker_data) = rules_worker(
        dir.path(),
        port,
        "archiver",
        "[sinks.copy]\ntype = \"file\"\npath = \"{agent}-{stream}.jsonl\"\n\
         [[rules]]\nname = \"copy\"\nfrom = [\"fleet/+/telemetry/heartbeat\"]\nto = [\"copy\"]\n",
        &[],
    );

    // an agent delivering to the server: the worker stores and acknowledges its
    // heartbeats, the server refuses them for now
    let opts = common::AgentOpts {
        id: Some("a1".into()),
        heartbeat_ms: 50,
        limit: 40,
        metrics: false,
        ..Default::default()
    };
    let mut agent = common::Proc::start(
        &[
            "agent",
            "--config",
            common::agent_config_opts(dir.path(), "a1", port, &opts)
                .to_str()
                .unwrap(),
        ],
        &dir.path().join("a1.log"),
    );
    let copies = || {
        fs::read_to_string(worker_data.join("a1-heartbeat.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert!(
        poll_until(Duration::from_secs(20), || copies() >= 40),
        "the worker stored {} heartbeats\n{}",
        copies(),
        worker.log_text()
    );
    assert!(server.records("a1", "heartbeat").len() < 40);
    // the server's sink comes back: every heartbeat reaches it, none was given up
    fs::remove_file(&blocker).unwrap();
    server.wait_records("a1", "heartbeat", 40);
    let seqs: Vec<u64> = server
        .records("a1", "heartbeat")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert!(agent.running());
}

/// Finding 13: a `rules run` worker with a server credential archived enrollment replies,
/// tokens included. Tokens are sealed to a key the enrolling agent made for its request
/// (anyone subscribed to the reply sees ciphertext), and enrollment traffic is never routed
/// to a sink, on any path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_never_cross_the_broker_in_clear_nor_reach_a_sink() {
    let dir = tempfile::tempdir().unwrap();
    let server = Secured::start(dir.path());
    let port = server.port;
    let boot_file = dir.path().join("bootstrap.token");
    server.enroll(
        "provision-edge",
        &[
            "--role",
            "bootstrap",
            "--groups",
            "edge",
            "--out",
            boot_file.to_str().unwrap(),
        ],
    );
    let archiver_token = dir.path().join("archiver.token");
    server.enroll(
        "archiver",
        &[
            "--role",
            "server",
            "--out",
            archiver_token.to_str().unwrap(),
        ],
    );
    let spy_token = server.enroll("spy", &["--role", "server"]);
    tokio::time::sleep(Duration::from_millis(700)).await; // the server reloads the store

    // a worker archiving everything it can subscribe to
    let (_worker, worker_data) = rules_worker(
        dir.path(),
        port,
        "archiver",
        "[sinks.all]\ntype = \"file\"\npath = \"all/{topic.1}.jsonl\"\n\
         [[rules]]\nname = \"all\"\nfrom = [\"#\"]\nto = [\"all\"]\n",
        &["--token-file", archiver_token.to_str().unwrap()],
    );
    // and a server-role client listening to enrollment replies
    let (spy, mut spy_events) = connect(port, "spy", &spy_token).await;
    spy.subscribe("fleet/enroll/+/reply", QoS::AtLeastOnce)
        .await
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let spied = seen.clone();
    let spying = tokio::spawn(async move {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = spy_events.poll().await {
                spied.lock().unwrap().push(p.payload.to_vec());
            }
        }
    });

    // an agent enrolls with the bootstrap token and delivers with its own
    let config = bootstrap_agent_config(dir.path(), port, "edge-9", &boot_file);
    let mut agent = Proc::start(
        &["agent", "--config", config.to_str().unwrap()],
        &dir.path().join("edge-9.log"),
    );
    server.wait_records("edge-9", "heartbeat", 5);
    agent.kill();
    let stored: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(dir.path().join("state-edge-9/credential.json")).unwrap(),
    )
    .unwrap();
    let token = stored["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64);

    // the reply on the wire: sealed, the token nowhere in it
    assert!(poll_until(Duration::from_secs(5), || !seen
        .lock()
        .unwrap()
        .is_empty()));
    spying.abort();
    for payload in seen.lock().unwrap().iter() {
        let text = String::from_utf8_lossy(payload);
        assert!(
            !text.contains(&token),
            "the token crossed the broker in clear: {text}"
        );
        let reply: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(reply["outcome"], "enrolled", "{reply}");
        assert!(reply["sealed_token"].as_str().unwrap().len() > 64);
    }
    // the worker archived telemetry, but no enrollment message and no token
    assert!(poll_until(Duration::from_secs(10), || worker_data
        .join("all/edge-9.jsonl")
        .is_file()));
    let mut archived = String::new();
    for entry in fs::read_dir(worker_data.join("all")).unwrap().flatten() {
        archived.push_str(&fs::read_to_string(entry.path()).unwrap());
    }
    assert!(!archived.contains("fleet/enroll"), "{archived}");
    assert!(!archived.contains(&token), "the token reached a sink");
    assert!(!dir.path().join("worker-data/all/enroll.jsonl").exists());
}

/// Publishes `n` QoS 0 messages from one connection, each on a topic of its own
/// (`topic(i)`), pausing now and then so the broker keeps up.
async fn publish_distinct(
    client: &rumqttc::AsyncClient,
    range: std::ops::Range<u64>,
    topic: impl Fn(u64) -> String,
    body: impl Fn(u64) -> String,
) {
    for i in range {
        client
            .publish(topic(i), QoS::AtMostOnce, false, body(i))
            .await
            .unwrap();
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Finding 7: one client publishing 110,000 distinct topics left +275 MiB that was never
/// freed (rumqttd kept a meter and a cache entry per topic for ever, and counted a
/// message's memory as its bytes alone), and the de-duplication snapshot grew to 9.3 MB,
/// rewritten every 5 s. Now the server's memory levels off however many topics one client
/// invents, and the de-duplication state keeps a bounded number of streams per agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_inventing_topics_and_streams_cannot_grow_the_server_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let server = Secured::start_with(
        dir.path(),
        false,
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let pid = server.proc.pid().unwrap();
    let (client, mut events) = connected(options(server.port, "a1", None)).await;
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    // 3,000 streams of one agent: more than the de-duplication state keeps per agent
    publish_distinct(
        &client,
        0..3000,
        |i| format!("fleet/a1/telemetry/s{i}"),
        |_| r#"{"seq":1,"epoch":1}"#.to_string(),
    )
    .await;
    // then topics nobody routes, in two rounds
    let other = |i: u64| format!("site/x/{i}");
    publish_distinct(&client, 0..40_000, other, |_| "{}".into()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_first = common::resident_kib(pid);
    publish_distinct(&client, 40_000..120_000, other, |_| "{}".into()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_second = common::resident_kib(pid);
    pump.abort();
    assert!(
        after_second < after_first + 16 * 1024,
        "80,000 more topics grew the server from {after_first} to {after_second} KiB"
    );
    let text = http_get(metrics_port, "/metrics");
    assert_eq!(metric(&text, "fleetbus_dedup_streams"), 1024, "{text}");
    assert!(metric(&text, "fleetbus_dedup_forgotten_total") >= 3000 - 1024);
    assert!(metric(&text, "fleetbus_broker_topic_cache_resets_total") >= 1);
    assert!(
        poll_until(Duration::from_secs(10), || fs::metadata(
            dir.path().join("data/wal/dedup.json")
        )
        .is_ok_and(|m| m.len() < 256 * 1024)),
        "de-duplication snapshot too large"
    );
}
