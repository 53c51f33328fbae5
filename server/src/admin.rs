//! The admin endpoint: the jobs API `fleetbus job ...` talks to.
//!
//! | method and path | body / query | answer |
//! |---|---|---|
//! | `POST /jobs` | a push request (JSON) | 201 and the job report |
//! | `GET /jobs?limit=N` | | the newest jobs with counts per state |
//! | `GET /jobs/{id}` | `executions=false`: counts only | the job with every execution |
//! | `POST /jobs/{id}/cancel` | `{}` (JSON) | the job after cancelling (counts) |
//! | `GET /agents?group=G&tag=K=V&meta=K=V&state=online` | | agents known from presence messages (each part given must hold) |
//! | `GET /agents/{id}` | | one agent: the registry's record (its last birth message: host, tags, cloud identity) and its latest job executions |
//! | `GET /agents/hours?hours=N&group=G&role=R` | | agents online per hour over the last N hours (168) |
//! | `POST /agents/{id}/forget` | `{}` (JSON) | what was forgotten: the agent, the jobs it was removed from |
//! | `GET /rules` | | the rules file, the generation in effect, the last reload, refused reloads and the last refusal |
//! | `GET /rules/tap?filter=F&rule=R` | | a live stream (JSON lines, one per message on the topics filter `F` matches, sampled: [`fleetbus_pipeline::tap`]) of what the engine did with each: the rules that matched (`R`: only that one), what each made, the sinks; until the client goes, the connection's `http.connection_lifetime` or the server's stop |
//! | `POST /rules/reload` | `{}` (JSON) | what the reload changed (sinks added, changed, removed), or 422 and every problem (the rules in effect stay) |
//! | `/events...`, `/silences` | | the event console ([`crate::console_api`]) |
//!
//! A request passes three checks before it reaches a handler ([`guard`]), in this order:
//!
//! 1. its `Host` header names the endpoint itself (the listen address, `localhost:PORT` on
//!    loopback, or one of `admin.allowed_hosts`), else 421: a page in a browser on this
//!    host cannot reach the endpoint by DNS rebinding;
//! 2. a POST carries `Content-Type: application/json`, else 415: a cross-site form (which
//!    a browser sends without asking) cannot change anything;
//! 3. `Authorization: Bearer TOKEN` is the token of a credential of role `operator` that is
//!    not revoked, else 401 (403 for another role).
//!
//! Each refusal is logged and emitted as an `admin-refused` security event. Errors answer
//! `{"error": "..."}` with 400 (bad request), 404 (no such job or agent) or 503 (a job
//! request while the job service is off: no `jobs.signing_key`; the agent registry works
//! without it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Path as UrlPath, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use fleetbus_broker::acl::Role;
use fleetbus_broker::credentials::CredentialStore;
use fleetbus_broker::Guard;
use fleetbus_jobs::{JobsError, PushRequest};
use fleetbus_protocol::BrokerEvent;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::job_service::{JobsHandle, Request as JobRequest};
use crate::rules_reload::RulesReloader;
use crate::ServerError;

type Jobs = Arc<JobsHandle>;

/// Who may use the endpoint: the credential store and the host names requests may name.
struct Gatekeeper {
    store: Mutex<CredentialStore>,
    hosts: Vec<String>,
    guard: Arc<Guard>,
}

/// What the admin API works on.
pub(crate) struct Services {
    /// The job service (jobs, agents).
    pub(crate) jobs: Jobs,
    /// The rules file's reloads, and the engine they reload (its live views).
    pub(crate) rules: Arc<RulesReloader>,
    /// Ends the live views at the server's stop.
    pub(crate) stop: crate::shutdown::StopSignal,
    /// The event console.
    pub(crate) console: Arc<crate::console_api::ConsoleApi>,
}

/// Binds `addr` and serves the admin API (operators authenticated against the credential
/// store in `data_dir`). Returns the bound address and the serving task.
pub(crate) async fn start(
    addr: SocketAddr,
    section: &crate::AdminSection,
    limits: crate::HttpSection,
    data_dir: &Path,
    services: Services,
    guard: Arc<Guard>,
    stop: crate::shutdown::StopSignal,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let store = CredentialStore::open_in(data_dir)?;
    let mut hosts = section.allowed_hosts.clone();
    hosts.push(addr.to_string());
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{}", addr.port()));
        hosts.push(format!("127.0.0.1:{}", addr.port()));
        hosts.push(format!("[::1]:{}", addr.port()));
    }
    let gatekeeper = Arc::new(Gatekeeper {
        store: Mutex::new(store),
        hosts,
        guard: guard.clone(),
    });
    let app = axum::Router::new()
        .route("/jobs", post(push).get(list))
        .route("/jobs/:id", get(report))
        .route("/jobs/:id/cancel", post(cancel))
        .route("/agents", get(agents))
        .route("/agents/hours", get(hours))
        .route("/agents/:id", get(agent))
        .route("/agents/:id/forget", post(forget))
        .with_state(services.jobs)
        .merge(
            axum::Router::new()
                .route("/rules", get(rules_status))
                .route("/rules/reload", post(rules_reload))
                .with_state(services.rules.clone()),
        )
        .merge(
            axum::Router::new()
                .route("/rules/tap", get(rules_tap))
                .with_state((services.rules, services.stop)),
        )
        .merge(crate::console_api::routes(services.console))
        .layer(axum::middleware::from_fn_with_state(gatekeeper, check));
    crate::http::serve("admin.listen", addr, app, limits, guard, stop).await
}

/// The three checks of the module documentation.
async fn check(
    State(gate): State<Arc<Gatekeeper>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let refusal = if !gate.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        Some((
            StatusCode::MISDIRECTED_REQUEST,
            format!("Host `{host}` is not this endpoint (admin.allowed_hosts)"),
        ))
    } else if request.method() == Method::POST && !is_json(headers) {
        Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a POST must carry Content-Type: application/json".to_string(),
        ))
    } else {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        match authenticate(&gate, token).await {
            Ok(who) => {
                let mut request = request;
                request.extensions_mut().insert(Operator(who));
                return next.run(request).await;
            }
            Err(refused) => Some(refused),
        }
    };
    let Some((status, reason)) = refusal else {
        return next.run(request).await;
    };
    let what = format!("{} {}", request.method(), request.uri().path());
    tracing::warn!(%peer, request = %what, %reason, "admin request refused");
    gate.guard.report(BrokerEvent::AdminRefused {
        peer: peer.to_string(),
        request: what,
        status: status.as_u16(),
        reason: reason.clone(),
        ts: chrono::Utc::now(),
    });
    error(status, reason)
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// The operator credential a request was made with (its id), for handlers that record
/// who did what.
#[derive(Debug, Clone)]
pub(crate) struct Operator(pub(crate) String);

/// The id of the live operator credential `token` belongs to; the refusal otherwise.
async fn authenticate(
    gate: &Arc<Gatekeeper>,
    token: Option<String>,
) -> Result<String, (StatusCode, String)> {
    let unauthorized = |reason: &str| (StatusCode::UNAUTHORIZED, reason.to_string());
    let Some(token) = token else {
        return Err(unauthorized(
            "no operator token (Authorization: Bearer ...; fleetbus agents enroll NAME --role operator)",
        ));
    };
    let gate = gate.clone();
    let found = tokio::task::spawn_blocking(move || {
        let store = gate.store.lock().unwrap_or_else(|p| p.into_inner());
        store.find_by_token(&token)
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match found {
        None => Err(unauthorized("unknown token")),
        Some(c) if c.revoked_at.is_some() => Err(unauthorized("credential revoked")),
        Some(c) if c.role != Role::Operator => Err((
            StatusCode::FORBIDDEN,
            format!(
                "credential `{}` has role {}, not operator",
                c.id,
                c.role.as_str()
            ),
        )),
        Some(c) => Ok(c.id),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn failed(e: JobsError) -> Response {
    let status = match &e {
        JobsError::NotFound(_) | JobsError::NoAgent(_) => StatusCode::NOT_FOUND,
        JobsError::Off => StatusCode::SERVICE_UNAVAILABLE,
        JobsError::Request(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Asks the job service and answers its result as JSON (`ok` on success).
async fn answer<T: serde::Serialize>(
    jobs: &Jobs,
    ok: StatusCode,
    make: impl FnOnce(oneshot::Sender<Result<T, JobsError>>) -> JobRequest,
) -> Response {
    match jobs.ask(make).await {
        Ok(value) => (ok, Json(value)).into_response(),
        Err(e) => failed(e),
    }
}

async fn push(State(jobs): State<Jobs>, Json(req): Json<PushRequest>) -> Response {
    answer(&jobs, StatusCode::CREATED, |tx| JobRequest::Push(req, tx)).await
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list(State(jobs): State<Jobs>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    answer(&jobs, StatusCode::OK, |tx| JobRequest::List(limit, tx)).await
}

#[derive(Deserialize)]
struct ReportQuery {
    executions: Option<bool>,
}

async fn report(
    State(jobs): State<Jobs>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ReportQuery>,
) -> Response {
    match q.executions {
        Some(false) => answer(&jobs, StatusCode::OK, |tx| JobRequest::Summary(id, tx)).await,
        _ => answer(&jobs, StatusCode::OK, |tx| JobRequest::Report(id, tx)).await,
    }
}

async fn agents(State(jobs): State<Jobs>, Query(q): Query<fleetbus_jobs::AgentFilter>) -> Response {
    answer(&jobs, StatusCode::OK, |tx| JobRequest::Agents(q, tx)).await
}

async fn agent(State(jobs): State<Jobs>, UrlPath(id): UrlPath<String>) -> Response {
    answer(&jobs, StatusCode::OK, |tx| JobRequest::Agent(id, tx)).await
}

async fn hours(
    State(jobs): State<Jobs>,
    Query(q): Query<crate::job_service::HoursQuery>,
) -> Response {
    answer(&jobs, StatusCode::OK, |tx| JobRequest::Hours(q, tx)).await
}

async fn forget(State(jobs): State<Jobs>, UrlPath(id): UrlPath<String>) -> Response {
    answer(&jobs, StatusCode::OK, |tx| JobRequest::Forget(id, tx)).await
}

async fn cancel(State(jobs): State<Jobs>, UrlPath(id): UrlPath<String>) -> Response {
    answer(&jobs, StatusCode::OK, |tx| JobRequest::Cancel(id, tx)).await
}

/// `GET /rules`
async fn rules_status(State(rules): State<Arc<RulesReloader>>) -> Response {
    Json(rules.status()).into_response()
}

/// `POST /rules/reload`
async fn rules_reload(
    State(rules): State<Arc<RulesReloader>>,
    Json(_): Json<serde_json::Value>,
) -> Response {
    match rules.reload().await {
        Ok(report) => Json(serde_json::json!({
            "generation": report.generation,
            "added": report.added,
            "changed": report.changed,
            "removed": report.removed,
            "unchanged": report.unchanged,
        }))
        .into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

/// The query of `GET /rules/tap`.
#[derive(Debug, Deserialize)]
struct TapQuery {
    /// An MQTT topic filter.
    filter: String,
    /// Only this rule's part.
    rule: Option<String>,
}

/// `GET /rules/tap`: one JSON line per message shown, as the engine handles it.
async fn rules_tap(
    State((rules, stop)): State<(Arc<RulesReloader>, crate::shutdown::StopSignal)>,
    Query(query): Query<TapQuery>,
) -> Response {
    let filter = match fleetbus_rules::TopicFilter::parse(&query.filter) {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("filter `{}`: {e}", query.filter),
            )
        }
    };
    let tap = match rules.engine().tap(filter, query.rule) {
        Ok(tap) => tap,
        Err(e) if e.contains("taps are open") => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let lines = futures_util::stream::unfold((tap, stop), |(mut tap, mut stop)| async move {
        let event = tokio::select! {
            event = tap.events.recv() => event?,
            _ = stop.stopped() => return None,
        };
        let mut line = serde_json::to_vec(&event).ok()?;
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            (tap, stop),
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(lines))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
