//! Serving an HTTP endpoint (metrics, admin) on the current runtime.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::ServerError;

/// Binds `addr` (the configuration key `key` names it in errors) and serves `app`.
/// Returns the bound address and the serving task; the task logs if serving stops.
pub(crate) async fn serve(
    key: &'static str,
    addr: SocketAddr,
    app: axum::Router,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Config(format!("{key} {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ServerError::Config(format!("{key} {addr}: {e}")))?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, endpoint = key, "HTTP endpoint stopped");
        }
    });
    Ok((bound, task))
}
