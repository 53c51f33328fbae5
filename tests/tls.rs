//! End to end: the encrypted listeners of a `fleetbus serve` process (MQTT over TLS and
//! MQTT over WebSocket over TLS, certificates from a throw-away CA), agent processes
//! connecting with `wss://` and with `mqtts://` through an HTTP CONNECT proxy, clients
//! with the wrong CA or no client certificate refused.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{free_port, poll_until, Proc, ServeProc};
use fleetbus_mqtt::{BrokerUrl, ClientTransport, TlsFiles};
use fleetbus_testkit::tls::{CertFiles, TestCa};
use fleetbus_testkit::ConnectProxy;
use rumqttc::ConnectionError;

/// A CA and a server certificate for localhost / 127.0.0.1 in `dir`.
fn certificates(dir: &Path) -> (std::path::PathBuf, CertFiles, TestCa) {
    let ca = TestCa::new("fleetbus test CA").unwrap();
    let ca_file = ca.write_ca(dir, "ca").unwrap();
    let server = ca
        .issue(dir, "server", &["localhost", "127.0.0.1"])
        .unwrap();
    (ca_file, server, ca)
}

/// The first outcome of connecting to `url` as `id`: Ok on a CONNACK.
async fn connect(url: &str, files: &TlsFiles, id: &str) -> Result<(), ConnectionError> {
    let url: BrokerUrl = url.parse().unwrap();
    let transport = ClientTransport::for_url(&url, files, None).unwrap();
    let opts = fleetbus_mqtt::options(&transport, id, Duration::from_secs(5), 10);
    common::first_connect_outcome(opts).await
}

fn server_config(port: u16, tls: &str) -> String {
    format!(
        "data_dir = \"data\"\n{}[broker]\nlisten = \"127.0.0.1:{port}\"\n\
         [broker.security]\nenforce = true\n[broker.tls]\n{tls}\n[rules]\nfile = \"rules.toml\"\n",
        common::admin_table()
    )
}

fn start_server(dir: &Path, tls: &str) -> (u16, ServeProc) {
    let port = free_port();
    fs::write(
        dir.join("rules.toml"),
        "[sinks.records]\ntype = \"file\"\npath = \"records/{agent}/{stream}.jsonl\"\n\
         [[rules]]\nname = \"telemetry\"\nfrom = [\"fleet/+/telemetry/#\"]\nto = [\"records\"]\n",
    )
    .unwrap();
    let proc = ServeProc::start(dir, &server_config(port, tls), move || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (port, proc)
}

fn enroll(dir: &Path, id: &str) -> std::path::PathBuf {
    let token = dir.join(format!("{id}.token"));
    common::fleetbus_with_data(
        &dir.join("data"),
        &["agents", "enroll", id, "--out", token.to_str().unwrap()],
    );
    token
}

fn start_agent(dir: &Path, id: &str, server: &str, extra: &str) -> Proc {
    let token = enroll(dir, id);
    let config = dir.join(format!("{id}.toml"));
    fs::write(
        &config,
        format!(
            "server = \"{server}\"\nstate_dir = \"state-{id}\"\nid = \"{id}\"\n\
             [metrics]\nenabled = false\n[heartbeat]\nenabled = true\ninterval = \"50ms\"\n\
             [connection]\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n\
             token_file = \"{}\"\nca_file = \"ca.pem\"\n{extra}",
            token.display()
        ),
    )
    .unwrap();
    Proc::start(
        &["agent", "--config", config.to_str().unwrap()],
        &dir.join(format!("{id}.log")),
    )
}

fn heartbeats(dir: &Path, id: &str) -> usize {
    fs::read_to_string(dir.join(format!("data/records/{id}/heartbeat.jsonl")))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_connect_over_wss_and_over_mqtts_through_a_proxy_and_a_wrong_ca_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_file, server_cert, _ca) = certificates(d);
    let (tls_port, wss_port) = (free_port(), free_port());
    let (_plain_port, server) = start_server(
        d,
        &format!(
            "listen = \"127.0.0.1:{tls_port}\"\nwebsocket_listen = \"127.0.0.1:{wss_port}\"\n\
             cert = \"{}\"\nkey = \"{}\"\n",
            server_cert.cert.display(),
            server_cert.key.display()
        ),
    );
    // the 443-only path: MQTT inside WebSocket inside TLS
    let mut ws_agent = start_agent(
        d,
        "edge-ws",
        &format!("wss://127.0.0.1:{wss_port}/mqtt"),
        "",
    );
    // mqtts:// by name through an HTTP CONNECT proxy
    let proxy = ConnectProxy::start().await.unwrap();
    let mut proxied = start_agent(
        d,
        "edge-proxied",
        &format!("mqtts://localhost:{tls_port}"),
        &format!("proxy = \"http://{}\"\n", proxy.addr()),
    );
    for (id, agent) in [("edge-ws", &mut ws_agent), ("edge-proxied", &mut proxied)] {
        assert!(
            poll_until(Duration::from_secs(20), || heartbeats(d, id) >= 5),
            "no heartbeats from {id}\n{}\n{}",
            agent.log_text(),
            server.log()
        );
    }
    assert!(proxy.tunnels() >= 1, "the agent did not use the proxy");

    // a client trusting another CA refuses the server's certificate
    let other = TestCa::new("someone else").unwrap();
    let wrong = TlsFiles {
        ca_file: Some(other.write_ca(d, "other-ca").unwrap()),
        ..TlsFiles::default()
    };
    for url in [
        format!("mqtts://127.0.0.1:{tls_port}"),
        format!("wss://127.0.0.1:{wss_port}/mqtt"),
    ] {
        let outcome = format!("{:?}", connect(&url, &wrong, "intruder").await);
        assert!(
            outcome.contains("InvalidCertificate(UnknownIssuer)"),
            "{url} with the wrong CA: {outcome}"
        );
    }
    // plain MQTT on the TLS port gets nowhere
    let right = TlsFiles {
        ca_file: Some(ca_file),
        ..TlsFiles::default()
    };
    assert!(connect(
        &format!("mqtt://127.0.0.1:{tls_port}"),
        &TlsFiles::default(),
        "plain"
    )
    .await
    .is_err());
    // the right CA reaches the broker, which then wants a token
    match connect(&format!("mqtts://127.0.0.1:{tls_port}"), &right, "nobody").await {
        Err(ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::BadUserNamePassword,
        )) => {}
        other => panic!("expected a refusal from the broker: {other:?}"),
    }
    ws_agent.kill();
    proxied.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_file, server_cert, ca) = certificates(d);
    let tls_port = free_port();
    let (_plain, _server) = start_server(
        d,
        &format!(
            "listen = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            server_cert.cert.display(),
            server_cert.key.display(),
            ca_file.display()
        ),
    );
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let without = TlsFiles {
        ca_file: Some(ca_file.clone()),
        ..TlsFiles::default()
    };
    assert!(
        matches!(
            connect(&url, &without, "no-cert").await,
            Err(ConnectionError::Tls(_) | ConnectionError::Io(_) | ConnectionError::MqttState(_))
        ),
        "a client without a certificate got through"
    );
    let client = ca.issue(d, "client", &["edge-9"]).unwrap();
    let with = TlsFiles {
        ca_file: Some(ca_file),
        client_cert: Some(client.cert.clone()),
        client_key: Some(client.key.clone()),
    };
    // past TLS: the broker answers (and wants a token)
    match connect(&url, &with, "edge-9").await {
        Err(ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::BadUserNamePassword,
        )) => {}
        other => panic!("expected the broker's refusal after the TLS handshake: {other:?}"),
    }
    // the certificate is bound to the client id: edge-10's own valid token with edge-9's
    // certificate is refused (hardening finding 14)...
    let edge10 = fs::read_to_string(enroll(d, "edge-10")).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await; // the server reloads the store
    let url_parsed: BrokerUrl = url.parse().unwrap();
    let transport = ClientTransport::for_url(&url_parsed, &with, None).unwrap();
    let mut opts = fleetbus_mqtt::options(&transport, "edge-10", Duration::from_secs(5), 10);
    opts.set_credentials("edge-10", edge10.trim());
    match common::first_connect_outcome(opts).await {
        Err(ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::NotAuthorized)) => {}
        other => panic!("a certificate naming edge-9 let edge-10 in: {other:?}"),
    }
    // ...and a whole mutual TLS session works: an agent with its own certificate delivers
    let mut agent = start_agent(
        d,
        "edge-9",
        &url,
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"\n",
            client.cert.display(),
            client.key.display()
        ),
    );
    assert!(
        poll_until(Duration::from_secs(20), || heartbeats(d, "edge-9") >= 5),
        "no heartbeats over mutual TLS\n{}",
        agent.log_text()
    );
    agent.kill();
}

/// SIGHUP rotates the certificate: the files are replaced on disk (a certificate from a
/// new CA), and new handshakes get the new one while the server keeps running; a broken
/// certificate file is refused and the one in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_file, server_cert, _ca) = certificates(d);
    let tls_port = free_port();
    let (_plain_port, server) = start_server(
        d,
        &format!(
            "listen = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            server_cert.cert.display(),
            server_cert.key.display()
        ),
    );
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let trusting = |ca: std::path::PathBuf| TlsFiles {
        ca_file: Some(ca),
        ..TlsFiles::default()
    };
    // reaching the broker (which then wants a token) means the handshake passed
    let handshake_passes = |outcome: &Result<(), ConnectionError>| {
        matches!(
            outcome,
            Err(ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::BadUserNamePassword
            ))
        )
    };
    assert!(handshake_passes(
        &connect(&url, &trusting(ca_file.clone()), "a").await
    ));

    let hangup = || common::sighup(server.pid().unwrap());
    // a new CA's certificate in place of the old one
    let new_ca = TestCa::new("fleetbus rotated CA").unwrap();
    let new_ca_file = new_ca.write_ca(d, "new-ca").unwrap();
    let fresh = new_ca
        .issue(d, "fresh", &["localhost", "127.0.0.1"])
        .unwrap();
    fs::copy(&fresh.cert, &server_cert.cert).unwrap();
    fs::copy(&fresh.key, &server_cert.key).unwrap();
    hangup();
    assert!(
        poll_until(Duration::from_secs(10), || server
            .log()
            .contains("TLS certificate and key reloaded")),
        "{}",
        server.log()
    );
    assert!(handshake_passes(
        &connect(&url, &trusting(new_ca_file.clone()), "b").await
    ));
    let old = format!("{:?}", connect(&url, &trusting(ca_file), "c").await);
    assert!(old.contains("InvalidCertificate(UnknownIssuer)"), "{old}");

    // a broken certificate file: refused, the rotated one stays
    fs::write(&server_cert.cert, "not a certificate").unwrap();
    hangup();
    assert!(
        poll_until(Duration::from_secs(10), || server
            .log()
            .contains("TLS certificate not reloaded")),
        "{}",
        server.log()
    );
    assert!(handshake_passes(
        &connect(&url, &trusting(new_ca_file), "d").await
    ));
}
