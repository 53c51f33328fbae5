//! The HTTP sink over TLS against a real HTTPS server in the test, whose certificate a
//! throw-away CA signed: trusted with `ca_file`, refused (and retried) without it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use fleetbus_protocol::Message;
use fleetbus_sinks::{Batch, ErrorClass, Item, SinkConfig, SinkPlace};
use http_body_util::BodyExt;

type Bodies = Arc<Mutex<Vec<String>>>;

/// Serves HTTPS on a free port until the test ends; returns its port and what it received.
async fn https_receiver(cert: &Path, key: &Path) -> (u16, Bodies) {
    let certs = fleetbus_mqtt::read_certificates("cert", cert).unwrap();
    let key = fleetbus_mqtt::read_private_key("key", key).unwrap();
    let config =
        tokio_rustls::rustls::ServerConfig::builder_with_provider(fleetbus_mqtt::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Bodies::default();
    let seen = bodies.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                // a client that does not trust us ends the handshake: nothing to serve
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            seen.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&body).into_owned());
                            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Empty::<
                                hyper::body::Bytes,
                            >::new(
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, bodies)
}

fn sink(toml_text: &str, dir: &Path) -> Box<dyn fleetbus_sinks::Sink> {
    let config: SinkConfig = toml::from_str(toml_text).unwrap();
    config.build(&SinkPlace::in_dir("hook", dir)).unwrap()
}

fn batch() -> Batch {
    let message = Message::decode("fleet/a/telemetry/m", br#"{"seq":1,"epoch":2}"#).unwrap();
    Batch {
        first: 1,
        next: 2,
        items: vec![Item::new(1, message)],
    }
}

#[tokio::test]
async fn a_receiver_signed_by_the_configured_ca_is_trusted_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let ca = fleetbus_testkit::tls::TestCa::new("webhook CA").unwrap();
    let ca_file = ca.write_ca(dir.path(), "ca").unwrap();
    let cert = ca.issue(dir.path(), "receiver", &["localhost"]).unwrap();
    let (port, bodies) = https_receiver(&cert.cert, &cert.key).await;

    let mut trusting = sink(
        &format!(
            "type = \"http\"\nurl = \"https://localhost:{port}/in\"\nca_file = \"{}\"\n",
            ca_file.display()
        ),
        dir.path(),
    );
    trusting.write(&batch()).await.unwrap();
    assert_eq!(bodies.lock().unwrap().len(), 1);
    assert!(bodies.lock().unwrap()[0].contains(r#""seq":1"#));

    // the system's CAs do not know the test CA: a TLS error, retried (never written)
    let mut system_roots = sink(
        &format!("type = \"http\"\nurl = \"https://localhost:{port}/in\"\n"),
        dir.path(),
    );
    let e = system_roots.write(&batch()).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert_eq!(bodies.lock().unwrap().len(), 1);
}
