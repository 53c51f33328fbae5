//! The admin endpoint: the jobs API `fleetbus job ...` talks to.
//!
//! | method and path | body / query | answer |
//! |---|---|---|
//! | `POST /jobs` | a push request (JSON) | 201 and the job report |
//! | `GET /jobs?limit=N` | | the newest jobs with counts per state |
//! | `GET /jobs/{id}` | `executions=false`: counts only | the job with every execution |
//! | `POST /jobs/{id}/cancel` | | the job after cancelling (counts) |
//! | `GET /agents?group=G` | | agents known from presence messages (one group's members) |
//!
//! Errors answer `{"error": "..."}` with 400 (bad request), 404 (no such job) or 503 (the
//! job service is off: no `jobs.signing_key`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use fleetbus_jobs::{JobsError, PushRequest};
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::jobs::{JobsHandle, Request};

use crate::ServerError;

type Jobs = Option<Arc<JobsHandle>>;

/// Binds `addr` and serves the admin API. Returns the bound address and the serving task.
pub async fn start(
    addr: SocketAddr,
    limits: crate::HttpSection,
    jobs: Jobs,
    guard: Arc<fleetbus_broker::Guard>,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let app = axum::Router::new()
        .route("/jobs", post(push).get(list))
        .route("/jobs/:id", get(report))
        .route("/jobs/:id/cancel", post(cancel))
        .route("/agents", get(agents))
        .with_state(jobs);
    crate::http::serve("admin.listen", addr, app, limits, guard).await
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn failed(e: JobsError) -> Response {
    let status = match &e {
        JobsError::NotFound(_) => StatusCode::NOT_FOUND,
        JobsError::Request(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// The answer when the job service is off.
fn off() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the job service is off: set jobs.signing_key in the server configuration (fleetbus keys generate)".into(),
    )
}

/// Asks the job service and answers its result as JSON (`ok` on success).
async fn answer<T: serde::Serialize>(
    jobs: &Jobs,
    ok: StatusCode,
    make: impl FnOnce(oneshot::Sender<Result<T, JobsError>>) -> Request,
) -> Response {
    let Some(jobs) = jobs.as_deref() else {
        return off();
    };
    match jobs.ask(make).await {
        Ok(value) => (ok, Json(value)).into_response(),
        Err(e) => failed(e),
    }
}

async fn push(State(jobs): State<Jobs>, Json(req): Json<PushRequest>) -> Response {
    answer(&jobs, StatusCode::CREATED, |tx| Request::Push(req, tx)).await
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list(State(jobs): State<Jobs>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    answer(&jobs, StatusCode::OK, |tx| Request::List(limit, tx)).await
}

#[derive(Deserialize)]
struct ReportQuery {
    executions: Option<bool>,
}

async fn report(
    State(jobs): State<Jobs>,
    Path(id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Response {
    match q.executions {
        Some(false) => answer(&jobs, StatusCode::OK, |tx| Request::Summary(id, tx)).await,
        _ => answer(&jobs, StatusCode::OK, |tx| Request::Report(id, tx)).await,
    }
}

#[derive(Deserialize)]
struct AgentsQuery {
    group: Option<String>,
}

async fn agents(State(jobs): State<Jobs>, Query(q): Query<AgentsQuery>) -> Response {
    answer(&jobs, StatusCode::OK, |tx| Request::Agents(q.group, tx)).await
}

async fn cancel(State(jobs): State<Jobs>, Path(id): Path<String>) -> Response {
    answer(&jobs, StatusCode::OK, |tx| Request::Cancel(id, tx)).await
}
