//! The built-ins that reach a server: a TCP port accepting a connection, an HTTP URL's
//! status. Each measures its time; one that cannot connect, or gets a status it does not
//! expect, is CRITICAL with why.

use std::time::{Duration, Instant};

use fleetbus_protocol::check::CheckState;

use super::{datum, HttpCheck, Measured, TcpCheck};
use crate::http_client;

/// The most bytes of a response body an HTTP check keeps (its size is measured up to
/// twice that).
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

pub(super) async fn http(c: &HttpCheck, timeout: Duration) -> Measured {
    let started = Instant::now();
    let request = http_client::Request {
        method: hyper::Method::GET,
        url: &c.url,
        headers: &[],
        timeout,
        ca_file: c.ca_file.as_deref(),
        body_limit: BODY_LIMIT,
    };
    let response = match http_client::send(&request).await {
        Ok(r) => r,
        Err(e) => return critical(format!("GET {}: {e}", c.url)),
    };
    let status = response.status;
    let size = response.body.len() + response.cut;
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
