//! The encrypted listeners: MQTT over TLS (`mqtts://`) and MQTT over WebSocket over TLS
//! (`wss://`, so that an agent needs nothing but an outbound connection to port 443).
//!
//! We accept these connections ourselves and hand each finished stream to rumqttd
//! (`Connections::serve`, a vendored addition): the TLS and WebSocket handshakes run in
//! the connection's own task with a deadline (rumqttd's own TLS listener runs them in its
//! accept loop, where one slow client stalls every other accept), and TLS is rustls 0.23
//! with the same crypto as the rest of the program.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::HeaderValue;
use rumqttd::{ConnectionStream, Connections};
use tokio::net::TcpListener;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use ws_stream_tungstenite::WsStream;

use crate::{BrokerError, Guard, PolicyProtocol, TlsConfig};

/// The rustls server configuration of `[broker.tls]`: certificate and key, and client
/// certificates required when `client_ca` is set.
pub(crate) fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, BrokerError> {
    let config_error = |e: String| BrokerError::Tls(e);
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Err(config_error("broker.tls: cert and key are required".into()));
    };
    let chain = fleetbus_mqtt::read_certificates("broker.tls.cert", cert)
        .map_err(|e| config_error(e.to_string()))?;
    let key = fleetbus_mqtt::read_private_key("broker.tls.key", key)
        .map_err(|e| config_error(e.to_string()))?;
    let provider = fleetbus_mqtt::crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in fleetbus_mqtt::read_certificates("broker.tls.client_ca", ca)
                .map_err(|e| config_error(e.to_string()))?
            {
                roots.add(c).map_err(|e| {
                    config_error(format!("broker.tls.client_ca {}: {e}", ca.display()))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| config_error(format!("broker.tls.client_ca: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        config_error(format!(
            "broker.tls: certificate {} and key do not go together: {e}",
            cert.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// The acceptor every TLS listener of a broker shares, swapped when the certificate is
/// rotated ([`crate::EmbeddedBroker::reload_tls`]).
pub(crate) type SharedAcceptor = Arc<std::sync::RwLock<TlsAcceptor>>;

/// One encrypted listener.
pub(crate) struct TlsListener {
    pub(crate) listener: TcpListener,
    pub(crate) acceptor: SharedAcceptor,
    pub(crate) websocket: bool,
    pub(crate) connections: Connections<PolicyProtocol>,
    pub(crate) guard: Arc<Guard>,
    /// Longest time a client may take for the TLS (and WebSocket) handshake.
    pub(crate) handshake_timeout: Duration,
}

impl TlsListener {
    /// Accepts until the task is aborted.
    pub(crate) async fn run(self) {
        let this = Arc::new(self);
        let mut backoff = crate::accept::AcceptBackoff::new(match this.websocket {
            true => "broker.tls.websocket_listen",
            false => "broker.tls.listen",
        });
        loop {
            let (stream, peer) = match this.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    let counter = &this.guard.counters().accept_backoffs;
                    backoff.pause_after(&e, counter).await;
                    continue;
                }
            };
            backoff.succeeded();
            let _ = stream.set_nodelay(true);
            let this = this.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(this.handshake_timeout, this.handshake(stream));
                match handshake.await {
                    Ok(Ok((stream, names))) => {
                        let protocol = this
                            .connections
                            .protocol()
                            .clone()
                            .with_certificate_names(names);
                        this.connections
                            .serve_with_protocol(stream, peer, protocol)
                            .await
                    }
                    Ok(Err(reason)) => this.failed(peer, &reason),
                    Err(_) => this.failed(peer, "handshake timed out"),
                }
            });
        }
    }

    /// The TLS (and WebSocket) handshake; the stream, and the names of the client's
    /// certificate when it presented one (mutual TLS).
    async fn handshake(
        &self,
        stream: tokio::net::TcpStream,
    ) -> Result<(Box<dyn ConnectionStream>, Option<Vec<String>>), String> {
        // the certificate in use when the handshake starts
        let acceptor = self
            .acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let names = match tls.get_ref().1.peer_certificates() {
            Some([leaf, ..]) => Some(certificate_names(leaf.as_ref())?),
            _ => None,
        };
        if !self.websocket {
            return Ok((Box::new(tls), names));
        }
        let ws = async_tungstenite::tokio::accept_hdr_async(tls, mqtt_subprotocol)
            .await
            .map_err(|e| format!("WebSocket: {e}"))?;
        Ok((Box::new(WsStream::new(ws)), names))
    }

    fn failed(&self, peer: SocketAddr, reason: &str) {
        self.guard
            .counters()
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%peer, reason, websocket = self.websocket, "handshake failed");
    }
}

/// The names a client certificate gives its holder: its subject's common names and its DNS
/// subject alternative names. Under mutual TLS the client id must be one of them.
pub(crate) fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate unreadable: {e}"))?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    Ok(names)
}

/// Answers the WebSocket upgrade with the `mqtt` subprotocol MQTT clients ask for. (The
/// signature is tungstenite's callback: its error type is large.)
#[allow(clippy::result_large_err)]
fn mqtt_subprotocol(_request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    response
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    Ok(response)
}

/// Binds `addr` with the broker's listen backlog, reporting a failure as a config error.
pub(crate) fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BrokerError> {
    let bind_error = |source| BrokerError::Bind { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    let listener = socket.listen(4096).map_err(bind_error)?;
    tracing::info!(%addr, key, "broker listening");
    Ok(listener)
}
