//! One HTTP/1.1 request at a time, over hyper: what the `http` check and the cloud
//! metadata lookups need (no connection pool, no redirects, no cookies). `https://` goes
//! through rustls with fleetbus's crypto provider, the server's certificate checked
//! against a CA file or the system's CAs. The whole exchange (connecting included) is
//! bounded by a timeout, and the body read is capped.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Uri};
use hyper_util::rt::TokioIo;

/// A request.
#[derive(Debug, Clone)]
pub(crate) struct Request<'a> {
    /// `GET`, `PUT`, ...
    pub method: Method,
    /// `http://host[:port]/path?query` or `https://...`.
    pub url: &'a str,
    /// Extra headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// How long the whole exchange may take.
    pub timeout: Duration,
    /// CA certificates for `https://` (the system's when `None`).
    pub ca_file: Option<&'a Path>,
    /// The most body bytes read; the rest is counted, not kept.
    pub body_limit: usize,
}

/// A response.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    /// The status code.
    pub status: u16,
    /// The headers (names lowercase), in order.
    pub headers: Vec<(String, String)>,
    /// The body, up to the limit.
    pub body: Vec<u8>,
    /// Body bytes past the limit (read and dropped, up to the limit again, then the
    /// connection is closed).
    pub cut: usize,
}

/// Whether `url` is an `http://` or `https://` URL with a host; the parsed URI.
pub(crate) fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri),
        _ => Err(format!(
            "`{url}` is not an http:// or https:// URL with a host"
        )),
    }
}

impl Response {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced), trimmed.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HttpError {
    /// No connection was made (refused, unreachable, no name, or not within the timeout).
    NotConnected(String),
    /// Connected, but no (complete) answer within the timeout.
    NoAnswer(Duration),
    /// Anything else (TLS, a broken response), with its causes.
    Failed(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::NotConnected(why) => f.write_str(why),
            HttpError::NoAnswer(within) => write!(f, "no answer within {within:?}"),
            HttpError::Failed(why) => f.write_str(why),
        }
    }
}

/// Sends `request`; the response, or what went wrong.
pub(crate) async fn send(request: &Request<'_>) -> Result<Response, HttpError> {
    let connected = std::sync::atomic::AtomicBool::new(false);
    match tokio::time::timeout(request.timeout, exchange(request, &connected)).await {
        Ok(result) => result,
        Err(_) if connected.load(std::sync::atomic::Ordering::Relaxed) => {
            Err(HttpError::NoAnswer(request.timeout))
        }
        Err(_) => Err(HttpError::NotConnected(format!(
            "no connection within {:?}",
            request.timeout
        ))),
    }
}

async fn exchange(
    request: &Request<'_>,
    connected: &std::sync::atomic::AtomicBool,
) -> Result<Response, HttpError> {
    let uri = parse_url(request.url).map_err(HttpError::Failed)?;
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| HttpError::NotConnected(format!("cannot connect to {host}:{port}: {e}")))?;
    connected.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tcp.set_nodelay(true);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let mut builder = hyper::Request::builder()
        .method(request.method.clone())
        .uri(path)
        .header(
            hyper::header::HOST,
            // the authority without any `user:password@`
            uri.authority()
                .and_then(|a| a.as_str().rsplit('@').next())
                .unwrap_or(&host),
        )
        .header(
            hyper::header::USER_AGENT,
            concat!("fleetbus-agent/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in request.headers {
        builder = builder.header(*name, *value);
    }
    let outgoing = builder
        .body(Full::new(Bytes::new()))
        .map_err(|e| HttpError::Failed(format!("request: {e}")))?;
    let result = if https {
        let config = fleetbus_mqtt::https_client_config("ca_file", request.ca_file)
            .map_err(HttpError::Failed)?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| HttpError::Failed(format!("`{host}` is not a TLS server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| HttpError::Failed(format!("TLS with {host}:{port}: {e}")))?;
        over(TokioIo::new(tls), outgoing, request.body_limit).await
    } else {
        over(TokioIo::new(tcp), outgoing, request.body_limit).await
    };
    result.map_err(HttpError::Failed)
}

async fn over<T>(
    io: T,
    outgoing: hyper::Request<Full<Bytes>>,
    limit: usize,
) -> Result<Response, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| fleetbus_support::error_chain(&e))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let response = sender
            .send_request(outgoing)
            .await
            .map_err(|e| fleetbus_support::error_chain(&e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut incoming = response.into_body();
        let mut body = Vec::new();
        let mut cut = 0usize;
        while let Some(frame) = incoming.frame().await {
            let frame = frame
                .map_err(|e| format!("reading the body: {}", fleetbus_support::error_chain(&e)))?;
            if let Some(data) = frame.data_ref() {
                let room = limit.saturating_sub(body.len());
                body.extend_from_slice(&data[..data.len().min(room)]);
                cut += data.len().saturating_sub(room);
                if cut > limit {
                    break; // enough: close the connection rather than read on
                }
            }
        }
        Ok(Response {
            status,
            headers,
            body,
            cut,
        })
    }
    .await;
    driver.abort();
    result
}
