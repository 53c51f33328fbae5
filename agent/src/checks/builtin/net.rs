//! The built-ins that reach a server: a TCP port accepting a connection, an HTTP URL's
//! status. Each measures its time; one that cannot connect, or gets a status it does not
//! expect, is CRITICAL with why.

use std::time::{Duration, Instant};

use fleetbus_protocol::check::CheckState;

use super::{datum, HttpCheck, Measured, TcpCheck};

/// The most bytes of a response body an HTTP check reads (its size is measured up to it).
const BODY_LIMIT: usize = 1024 * 1024;

fn critical(text: String) -> Measured {
    Measured {
        fixed: Some(CheckState::Critical),
        text,
        values: Vec::new(),
    }
}

fn seconds(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 1e6).round() / 1e6
}

pub(super) async fn tcp(c: &TcpCheck, timeout: Duration) -> Measured {
    let started = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&c.address)).await {
        Err(_) => critical(format!("no connection to {} within {timeout:?}", c.address)),
        Ok(Err(e)) => critical(format!("cannot connect to {}: {e}", c.address)),
        Ok(Ok(_stream)) => {
            let took = seconds(started.elapsed());
            Measured {
                fixed: None,
                text: format!("{took:.3} s to connect to {}", c.address),
                values: vec![(datum("time", took, "s", Some(0.0), None), true)],
            }
        }
    }
}

/// Whether `url` is an http(s) URL with a host.
pub(super) fn parse_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}`: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(format!(
            "`{url}` is not an http:// or https:// URL with a host"
        ));
    }
    Ok(parsed)
}

pub(super) async fn http(c: &HttpCheck, timeout: Duration) -> Measured {
    let url = match parse_url(&c.url) {
        Ok(u) => u,
        Err(e) => return critical(e),
    };
    let tls = match fleetbus_mqtt::https_client_config("http.ca_file", c.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            return Measured {
                fixed: Some(CheckState::Unknown),
                text: format!("TLS settings: {e}"),
                values: Vec::new(),
            }
        }
    };
    let client = match reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("fleetbus-agent/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => return critical(format!("HTTP client: {e}")),
    };
    let started = Instant::now();
    let mut response = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => return critical(format!("GET {}: {}", c.url, error_chain(&e))),
    };
    let status = response.status().as_u16();
    let mut size = 0usize;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                size += chunk.len();
                if size >= BODY_LIMIT {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return critical(format!(
                    "GET {}: reading the body: {}",
                    c.url,
                    error_chain(&e)
                ))
            }
        }
    }
    let took = seconds(started.elapsed());
    let expected = if c.expect.is_empty() {
        (200..400).contains(&status)
    } else {
        c.expect.contains(&status)
    };
    Measured {
        fixed: (!expected).then_some(CheckState::Critical),
        text: format!(
            "{status}{} from {} in {took:.3} s ({size} bytes)",
            if expected { "" } else { " (not expected)" },
            c.url
        ),
        values: vec![
            (datum("time", took, "s", Some(0.0), None), true),
            (datum("size", size as f64, "B", Some(0.0), None), false),
        ],
    }
}

/// An error and its causes, `: `-joined (reqwest's own text omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
