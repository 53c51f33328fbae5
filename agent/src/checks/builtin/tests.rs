use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with(f: impl FnOnce(&mut CheckConfig)) -> CheckConfig {
    let mut c = CheckConfig::new(&[], Duration::from_secs(10));
    c.timeout = Duration::from_secs(5);
    f(&mut c);
    c
}

async fn outcome(config: &CheckConfig) -> Outcome {
    let builtin = Builtin::of(config).expect("a built-in");
    run(builtin, config).await.0
}

fn range(t: &str) -> Option<Range> {
    Some(Range::parse(t).unwrap())
}

#[tokio::test]
async fn disk_reports_each_mount_in_percent_and_a_missing_mount_is_unknown() {
    let root = with(|c| {
        c.disk = Some(DiskCheck {
            mounts: vec!["/".into()],
        })
    });
    let o = outcome(&root).await;
    assert_eq!(o.perfdata.len(), 1, "{o:?}");
    let d = &o.perfdata[0];
    assert_eq!((d.label.as_str(), d.unit.as_str()), ("/", "%"));
    let used = d.value.unwrap();
    assert!((0.0..=100.0).contains(&used));
    // the defaults, 80 and 90, decide the state
    let expected = if used > 90.0 {
        CheckState::Critical
    } else if used > 80.0 {
        CheckState::Warning
    } else {
        CheckState::Ok
    };
    assert_eq!(o.state, expected, "{o:?}");
    assert!(
        o.output.starts_with(&format!("DISK {expected} - / ")),
        "{}",
        o.output
    );
    assert_eq!(d.warn, range("80"));
    // a threshold the value is inside of alerts: WARNING
    let inside = with(|c| {
        c.disk = root.disk.clone();
        c.warn = range("@0:100");
        c.crit = range("101");
    });
    assert_eq!(outcome(&inside).await.state, CheckState::Warning);
    let missing = with(|c| {
        c.disk = Some(DiskCheck {
            mounts: vec!["/".into(), "/no/such/mount".into()],
        })
    });
    let o = outcome(&missing).await;
    assert_eq!(o.state, worse(expected, CheckState::Unknown));
    assert!(
        o.output.contains("not mounted: /no/such/mount"),
        "{}",
        o.output
    );
}

#[tokio::test]
async fn load_memory_and_swap_measure_and_compare() {
    let load = with(|c| {
        c.load = Some(LoadCheck { per_cpu: true });
        c.crit = range("@0:");
    });
    let o = outcome(&load).await;
    let labels: Vec<&str> = o.perfdata.iter().map(|d| d.label.as_str()).collect();
    assert_eq!(labels, ["load1", "load5", "load15"]);
    assert_eq!(o.state, CheckState::Critical, "{o:?}");
    assert!(
        o.output
            .starts_with("LOAD CRITICAL - load average per CPU: "),
        "{}",
        o.output
    );
    let memory = with(|c| {
        c.memory = Some(UsageCheck {});
        c.warn = range("@0:100");
        c.crit = range("@200:300");
    });
    let o = outcome(&memory).await;
    assert_eq!(o.state, CheckState::Warning, "{o:?}");
    assert_eq!(o.perfdata[0].label, "used");
    assert!(o.perfdata[0].value.unwrap() > 0.0);
    assert!(o.perfdata[1].warn.is_none(), "bytes are not judged");
    let swap = outcome(&with(|c| c.swap = Some(UsageCheck {}))).await;
    assert_ne!(swap.state, CheckState::Unknown, "{swap:?}");
}

#[tokio::test]
async fn a_process_present_is_ok_and_one_absent_is_critical() {
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let present = with(|c| {
        c.process = Some(ProcessCheck {
            name: "sleep".into(),
        })
    });
    let o = outcome(&present).await;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(o.state, CheckState::Ok, "{o:?}");
    assert!(o.perfdata[0].value.unwrap() >= 1.0);
    let absent = with(|c| {
        c.process = Some(ProcessCheck {
            name: "no-such-proc-q".into(),
        })
    });
    let o = outcome(&absent).await;
    assert_eq!(o.state, CheckState::Critical, "{o:?}");
    assert_eq!(
        o.output,
        "PROCS CRITICAL - 0 processes named no-such-proc-q"
    );
}

#[tokio::test]
async fn a_tcp_port_answering_is_ok_with_its_time_and_a_closed_one_critical() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap().to_string();
    let o = outcome(&with(|c| {
        c.tcp = Some(TcpCheck {
            address: open.clone(),
        })
    }))
    .await;
    assert_eq!(o.state, CheckState::Ok, "{o:?}");
    assert_eq!(o.perfdata[0].label, "time");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let o = outcome(&with(|c| {
        c.tcp = Some(TcpCheck {
            address: closed.clone(),
        })
    }))
    .await;
    assert_eq!(o.state, CheckState::Critical, "{o:?}");
    assert!(
        o.output.contains(&format!("cannot connect to {closed}")),
        "{}",
        o.output
    );
}

/// An HTTP server inside the test answering every request with `status` (or, for 0,
/// never answering).
async fn http_server(status: u16) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                if status == 0 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let body = "fine\n";
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn an_http_check_judges_the_status_and_the_time() {
    let ok = http_server(200).await;
    let check = |url: &str, expect: Vec<u16>| {
        let url = url.to_string();
        with(move |c| {
            c.http = Some(HttpCheck {
                url,
                expect,
                ca_file: None,
            })
        })
    };
    let o = outcome(&check(&ok, vec![])).await;
    assert_eq!(o.state, CheckState::Ok, "{o:?}");
    assert!(
        o.output
            .starts_with(&format!("HTTP OK - 200 from {ok} in ")),
        "{}",
        o.output
    );
    assert_eq!(o.perfdata[1].value, Some(5.0), "the body's size");
    let down = http_server(503).await;
    let o = outcome(&check(&down, vec![])).await;
    assert_eq!(o.state, CheckState::Critical);
    assert!(o.output.contains("503 (not expected)"), "{}", o.output);
    assert_eq!(
        outcome(&check(&down, vec![503])).await.state,
        CheckState::Ok
    );
    // slower than a microsecond: the warning range on the time
    let mut slow = check(&ok, vec![]);
    slow.warn = range("0.000001");
    assert_eq!(outcome(&slow).await.state, CheckState::Warning);
    // a server that never answers: CRITICAL within the check's timeout
    let silent = http_server(0).await;
    let mut hung = check(&silent, vec![]);
    hung.timeout = Duration::from_millis(300);
    let o = outcome(&hung).await;
    assert!(
        matches!(o.state, CheckState::Critical | CheckState::Unknown),
        "{o:?}"
    );
    assert!(o.duration < Duration::from_secs(5));
}

#[test]
fn a_check_is_one_thing_and_its_settings_are_checked() {
    let problems = |c: &CheckConfig| {
        let mut p = fleetbus_config::Problems::new();
        c.check(&mut p);
        p.into_vec()
            .into_iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    };
    let two = with(|c| {
        c.command = vec!["true".into()];
        c.memory = Some(UsageCheck {});
    });
    assert!(
        problems(&two)[0].contains("a check has one of"),
        "{:?}",
        problems(&two)
    );
    let bad = with(|c| {
        c.tcp = Some(TcpCheck {
            address: "nohost".into(),
        })
    });
    assert!(
        problems(&bad)[0].contains("`nohost` is not host:port"),
        "{:?}",
        problems(&bad)
    );
    let url = with(|c| {
        c.http = Some(HttpCheck {
            url: "ftp://x/".into(),
            expect: vec![],
            ca_file: None,
        })
    });
    assert!(
        problems(&url)[0].contains("not an http:// or https:// URL"),
        "{:?}",
        problems(&url)
    );
    let thresholds = with(|c| {
        c.command = vec!["true".into()];
        c.warn = range("1");
    });
    assert!(problems(&thresholds)[0].contains("a built-in's thresholds"));
    assert!(problems(&with(|c| c.memory = Some(UsageCheck {}))).is_empty());
}

/// An HTTPS server inside the test with a certificate for 127.0.0.1 from a CA made here:
/// the check trusts it through `ca_file`, and refuses it without (the system's CAs do not
/// know it).
#[tokio::test]
async fn an_https_check_verifies_the_server_against_its_ca_file() {
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(fleetbus_mqtt::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/health", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let check = |ca: Option<std::path::PathBuf>| {
        let url = url.clone();
        with(move |c| {
            c.http = Some(HttpCheck {
                url,
                expect: vec![],
                ca_file: ca,
            })
        })
    };
    let trusted = outcome(&check(Some(ca_file))).await;
    assert_eq!(trusted.state, CheckState::Ok, "{trusted:?}");
    assert_eq!(trusted.perfdata[1].value, Some(3.0));
    let unknown = outcome(&check(None)).await;
    assert_eq!(unknown.state, CheckState::Critical, "{unknown:?}");
    assert!(
        unknown.output.contains("TLS with 127.0.0.1"),
        "{}",
        unknown.output
    );
}
