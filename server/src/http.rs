//! Serving an HTTP endpoint (metrics, admin) on the current runtime, with the bounds of
//! `[http]` ([`HttpSection`]) that keep one client from holding it (or the process's file
//! descriptors) for everyone: connections open at once per endpoint (one more is closed
//! at once), the time to send a request's headers (and to begin the next request on a
//! kept-alive connection), a connection's whole life, the size of a request body.
//!
//! At the stop signal the endpoint stops accepting, closes idle kept-alive connections and
//! lets requests in flight finish (each within its connection's lifetime); its task ends
//! when the last connection has.
//!
//! A failed `accept` (out of file descriptors) pauses the loop
//! ([`fleetbus_broker::accept`]) instead of spinning. Counters: the guard's
//! `http_refused_connections`, `http_timed_out` and `accept_backoffs`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleetbus_broker::accept::AcceptBackoff;
use fleetbus_broker::Guard;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::shutdown::StopSignal;
use crate::{HttpSection, ServerError};

/// Binds `addr` (the configuration key `key` names it in errors) and serves `app` within
/// `limits`, counting in `guard`'s counters. Returns the bound address and the serving task.
pub(crate) async fn serve(
    key: &'static str,
    addr: SocketAddr,
    app: axum::Router,
    limits: HttpSection,
    guard: Arc<Guard>,
    stop: StopSignal,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { key, addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { key, addr, source })?;
    let app = app.layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes));
    let task = tokio::spawn(accept_loop(key, listener, app, limits, guard, stop));
    Ok((bound, task))
}

async fn accept_loop(
    key: &'static str,
    listener: TcpListener,
    app: axum::Router,
    limits: HttpSection,
    guard: Arc<Guard>,
    mut stop: StopSignal,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = AcceptBackoff::new(key);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // the connections belong to this loop: at the stop signal each one finishes the request
    // in flight and closes (an idle keep-alive connection at once), so none holds what its
    // handlers hold (the job service) until it times out
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.stopped() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                backoff
                    .pause_after(&e, &guard.counters().accept_backoffs)
                    .await;
                continue;
            }
        };
        backoff.succeeded();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // closing at once frees the descriptor; the client may come back later
            guard
                .counters()
                .http_refused_connections
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(endpoint = key, %peer, "connection refused: http.max_connections open");
            drop(stream);
            continue;
        };
        // handlers may ask who is calling (ConnectInfo), as with axum::serve
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let service = TowerToHyperService::new(app);
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let guard = guard.clone();
        let lifetime = limits.connection_lifetime;
        let mut stop = stop.clone();
        connections.spawn(async move {
            let served = async move {
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    ended = connection.as_mut() => ended,
                    _ = stop.stopped() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            };
            match tokio::time::timeout(lifetime, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if e.is_timeout() {
                        guard
                            .counters()
                            .http_timed_out
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(endpoint = key, %peer, error = %e, "connection ended");
                }
                Err(_) => {
                    guard
                        .counters()
                        .http_timed_out
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(endpoint = key, %peer, "connection closed: lifetime over");
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
