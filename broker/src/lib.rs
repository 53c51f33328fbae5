//! The embedded MQTT broker: rumqttd behind a small API of our own.
//!
//! - [`BrokerConfig`] is validated before rumqttd sees it (rumqttd's own defaults are all
//!   zeros and make its router panic or drop every client).
//! - [`EmbeddedBroker::start`] spawns the router; in-process consumers (the rules engine)
//!   attach with [`EmbeddedBroker::local_link`] *before* [`EmbeddedBroker::listen`] opens
//!   the network listener, so no agent message can arrive before they are subscribed.
//! - The listener runs on the caller's tokio runtime and speaks through
//!   [`PolicyProtocol`], our wrapper around rumqttd's MQTT v4 codec: every decoded packet
//!   of every connection passes through it, which is where connection policy lives.

pub mod accept;
pub mod acl;
mod config;
pub mod credentials;
mod guard;
mod policy;
mod tls_listener;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::{BrokerConfig, LimitsConfig, SecurityConfig, TlsConfig};
pub use guard::{EventSink, Guard, SecurityCounters};
pub use policy::{Gate, PolicyProtocol};
pub use rumqttd::local::{LinkRx, LinkTx};
pub use rumqttd::Notification;

/// Errors starting or using the embedded broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration was refused (see the [`fleetbus_config::Check`] of
    /// [`BrokerConfig`]): every problem, at its key (`broker.max_connections`).
    #[error("invalid broker configuration: {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Config(Vec<fleetbus_config::Problem>),
    /// The listen address cannot be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The listener did not come up.
    #[error("broker listener on {addr} did not start within {waited:?}")]
    NotListening {
        /// The configured address.
        addr: SocketAddr,
        /// How long we waited.
        waited: Duration,
    },
    /// The TLS settings cannot be used (files missing, unreadable, not matching).
    #[error("{0}")]
    Tls(String),
    /// An in-process link could not be attached to the router.
    #[error("cannot attach in-process client `{client_id}` to the broker: {reason}")]
    Link {
        /// The local client's id.
        client_id: String,
        /// rumqttd's explanation.
        reason: String,
    },
}

type LinkFactory = Arc<dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;
type ListenerFuture = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;
type ListenerFactory =
    Box<dyn FnOnce(rumqttd::ServerSettings, PolicyProtocol) -> ListenerFuture + Send>;
type ConnectionsFactory = Box<
    dyn Fn(rumqttd::ServerSettings, PolicyProtocol) -> rumqttd::Connections<PolicyProtocol> + Send,
>;

/// A running embedded broker. Dropping it does not stop the router thread (rumqttd has no
/// shutdown API); call [`EmbeddedBroker::stop`] to close the listener and refuse all
/// further traffic on connections that are still open.
pub struct EmbeddedBroker {
    config: BrokerConfig,
    gate: Arc<Gate>,
    guard: Arc<Guard>,
    // rumqttd's router channel type is not nameable outside rumqttd, so the two things we do
    // with it are captured in closures.
    links: LinkFactory,
    listener_factory: Option<ListenerFactory>,
    connections_factory: ConnectionsFactory,
    listener: Option<tokio::task::JoinHandle<()>>,
    tls_listeners: Vec<tokio::task::JoinHandle<()>>,
    /// The TLS listeners' certificate and key, swapped by [`EmbeddedBroker::reload_tls`].
    tls_acceptor: Option<tls_listener::SharedAcceptor>,
}

impl EmbeddedBroker {
    /// Validates `config` and spawns the router thread. No network listener yet. Nothing
    /// is enforced and no events are emitted (see [`EmbeddedBroker::start_guarded`]).
    pub fn start(config: BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
        EmbeddedBroker::start_guarded(config, Arc::new(Guard::default()))
    }

    /// [`EmbeddedBroker::start`] with `guard` admitting connections, checking their
    /// packets and receiving their events.
    pub fn start_guarded(
        config: BrokerConfig,
        guard: Arc<Guard>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        // a library guard for callers that start the broker alone; `serve` has checked
        // the whole server configuration already
        let mut problems = fleetbus_config::Problems::new();
        problems.section("broker", |p| fleetbus_config::Check::check(&config, p));
        if !problems.is_empty() {
            return Err(BrokerError::Config(problems.into_vec()));
        }
        let router_tx = rumqttd::Router::new(0, config.router_config()).spawn();
        let link_tx = router_tx.clone();
        let links: LinkFactory = Arc::new(move |client_id: &str| {
            rumqttd::local::LinkBuilder::new(client_id, link_tx.clone())
                .build()
                .map(|(tx, rx, _connack)| (tx, rx))
                .map_err(|e| e.to_string())
        });
        let connections_tx = router_tx.clone();
        let connections_factory: ConnectionsFactory = Box::new(move |settings, protocol| {
            rumqttd::Server::new(settings, connections_tx.clone(), protocol).connections()
        });
        let listener_factory: ListenerFactory = Box::new(move |settings, protocol| {
            Box::pin(async move {
                let mut server = rumqttd::Server::new(settings, router_tx, protocol);
                match server.start(rumqttd::LinkType::Remote).await {
                    Ok(()) => "listener stopped".to_string(),
                    Err(e) => e.to_string(),
                }
            })
        });
        Ok(EmbeddedBroker {
            config,
            gate: Arc::new(Gate::default()),
            guard,
            links,
            listener_factory: Some(listener_factory),
            connections_factory,
            listener: None,
            tls_listeners: Vec::new(),
            tls_acceptor: None,
        })
    }

    /// Attaches an in-process client (e.g. the rules engine) directly to the router: no
    /// socket, no encoding. Its subscriptions see every matching publish. `client_id` is
    /// reserved from then on: a network client asking for it is refused (CONNACK 2), so it
    /// cannot take the link over.
    pub fn local_link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        self.guard.reserve(client_id);
        (self.links)(client_id).map_err(|reason| BrokerError::Link {
            client_id: client_id.to_string(),
            reason,
        })
    }

    /// Opens the MQTT listener on the configured address (on the current tokio runtime)
    /// and waits until it accepts connections. Calling it twice is a no-op.
    pub async fn listen(&mut self) -> Result<SocketAddr, BrokerError> {
        let addr = self.config.listen;
        let Some(factory) = self.listener_factory.take() else {
            return Ok(addr);
        };
        // rumqttd binds inside its accept loop and only logs failures; bind first ourselves
        // so that "address in use" is an error the operator sees.
        StdTcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
        let settings = self.config.server_settings();
        let protocol = PolicyProtocol::new(self.gate.clone(), self.guard.clone());
        self.listen_tls(&settings, &protocol)?;
        self.listener = Some(tokio::spawn(async move {
            let reason = factory(settings, protocol).await;
            tracing::error!(%addr, %reason, "broker listener ended");
        }));
        // wait until rumqttd accepts connections. The probe connects and closes at once
        // (rumqttd sees an empty connection end). Probing by binding would race: holding
        // the port for an instant can make rumqttd's own bind fail.
        let waited = Duration::from_secs(5);
        let deadline = Instant::now() + waited;
        let probe_addr = match addr.ip().is_unspecified() {
            true => SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port())),
            false => addr,
        };
        while Instant::now() < deadline {
            let probe = tokio::net::TcpStream::connect(probe_addr);
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), probe).await {
                drop(stream);
                tracing::info!(%addr, "broker listening");
                return Ok(addr);
            }
            if self.listener.as_ref().is_some_and(|l| l.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(BrokerError::NotListening { addr, waited })
    }

    /// A handle that drops clients' live connections (see [`ClientDropper::drop_client`]).
    pub fn dropper(&self) -> ClientDropper {
        ClientDropper {
            links: self.links.clone(),
            guard: self.guard.clone(),
        }
    }

    /// Opens the `[broker.tls]` listeners that are configured.
    fn listen_tls(
        &mut self,
        settings: &rumqttd::ServerSettings,
        protocol: &PolicyProtocol,
    ) -> Result<(), BrokerError> {
        let tls = &self.config.tls;
        let listeners = [
            (tls.listen, false, "broker.tls.listen"),
            (tls.websocket_listen, true, "broker.tls.websocket_listen"),
        ];
        if listeners.iter().all(|(addr, _, _)| addr.is_none()) {
            return Ok(());
        }
        let acceptor: tls_listener::SharedAcceptor = Arc::new(std::sync::RwLock::new(
            tokio_rustls::TlsAcceptor::from(tls_listener::server_config(tls)?),
        ));
        self.tls_acceptor = Some(acceptor.clone());
        for (addr, websocket, key) in listeners {
            let Some(addr) = addr else { continue };
            let listener = tls_listener::TlsListener {
                listener: tls_listener::bind(addr, key)?,
                acceptor: acceptor.clone(),
                websocket,
                connections: (self.connections_factory)(settings.clone(), protocol.clone()),
                guard: self.guard.clone(),
                handshake_timeout: self.config.connect_timeout,
            };
            self.tls_listeners.push(tokio::spawn(listener.run()));
        }
        Ok(())
    }

    /// Reads the TLS listeners' certificate, key and client CA files again (rotated on
    /// disk) and uses them for every handshake from now on; connections already up keep
    /// theirs. `Ok(false)` when no TLS listener is open; on an error the files in use stay.
    pub fn reload_tls(&self) -> Result<bool, BrokerError> {
        let Some(acceptor) = &self.tls_acceptor else {
            return Ok(false);
        };
        let fresh = tokio_rustls::TlsAcceptor::from(tls_listener::server_config(&self.config.tls)?);
        *acceptor.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(true)
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Stops accepting connections and refuses every further packet on open ones (their
    /// clients see the connection close and reconnect elsewhere or later).
    pub fn stop(&mut self) {
        self.gate.close();
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
        for listener in self.tls_listeners.drain(..) {
            listener.abort();
        }
    }
}

/// Drops live connections of the embedded broker by client id.
#[derive(Clone)]
pub struct ClientDropper {
    links: LinkFactory,
    guard: Arc<Guard>,
}

impl ClientDropper {
    /// Ends `client_id`'s live connection, if any; its end reports `reason`. rumqttd has no
    /// call for that, but a new connection with the same client id takes the session over
    /// and the router drops the old one: an in-process link does that and then ends itself.
    /// Returns false when the client was not connected (nothing to drop).
    pub fn drop_client(&self, client_id: &str, reason: &str) -> Result<bool, BrokerError> {
        if !self.guard.dropping(client_id, reason) {
            return Ok(false);
        }
        let link_error = |reason: String| BrokerError::Link {
            client_id: client_id.to_string(),
            reason,
        };
        let (tx, _rx) = (self.links)(client_id).map_err(link_error)?;
        tx.disconnect().map_err(|e| link_error(e.to_string()))?;
        Ok(true)
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often the router's cache of topics (and the filters matching each) was full and
/// started over: a client publishing very many distinct topics (bounded at
/// [`rumqttd::MAX_CACHED_TOPICS`] topics; the process has one router).
pub fn topic_cache_resets() -> u64 {
    rumqttd::TOPIC_CACHE_RESETS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for tests and the demo: rumqttd
/// cannot listen on port 0 and report the port it got); never the same twice in one
/// process ([`fleetbus_support::free_port`]).
pub fn free_port() -> std::io::Result<u16> {
    fleetbus_support::free_port()
}
