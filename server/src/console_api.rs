//! The event console's part of the admin endpoint (`fleetbus events ...`), behind the
//! same checks as the rest of it (an operator credential):
//!
//! | method and path | body / query | answer |
//! |---|---|---|
//! | `GET /events` | `open`, `min_severity`, `agent`, `group`, `silenced`, `limit` | rows, the latest first |
//! | `GET /events/{id}` | | one row |
//! | `POST /events/{id}/ack` | `{"comment": "..."}` | the row, acknowledged |
//! | `POST /events/{id}/close` | `{"comment": "..."}` | the row, closed |
//! | `GET /silences` | | the silences in effect |
//! | `GET /checks?agent=ID` | | the agent's checks, each with its latest result |
//! | `POST /silences` | `{"agent", "rule", "group", "duration" (seconds), "comment"}` | the silence |
//!
//! Each change is itself a message the rules engine routes, on
//! `fleet/server/console/{ack,close,silence}`: `{"action", "by", "comment", "event"}` (the
//! row after the change) or `{"action", "by", "silence"}`.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use fleetbus_console::{ConsoleError, Filter, RowState, Silence};
use fleetbus_pipeline::Engine;
use fleetbus_sinks::console::Store;
use serde::Deserialize;

use crate::admin::Operator;

/// The topic a console change of `action` is routed on.
pub fn change_topic(action: &str) -> String {
    format!("fleet/server/console/{action}")
}

/// The console the endpoint works on, and the engine its changes go to.
pub(crate) struct ConsoleApi {
    store: Store,
    engine: Arc<Engine>,
}

type Api = Arc<ConsoleApi>;

impl ConsoleApi {
    /// The API over `store` (opened or connected at the first request).
    pub(crate) fn new(store: Store, engine: Arc<Engine>) -> ConsoleApi {
        ConsoleApi { store, engine }
    }

    /// Hands a change to the rules engine.
    fn announce(&self, action: &str, body: serde_json::Value) {
        match serde_json::to_vec(&body) {
            Ok(payload) => self.engine.dispatch(&change_topic(action), &payload),
            Err(e) => tracing::error!(error = %e, "console change not encoded"),
        }
    }
}

/// The console's routes.
pub(crate) fn routes(api: Api) -> axum::Router {
    axum::Router::new()
        .route("/events", get(list))
        .route("/events/:id", get(one))
        .route("/events/:id/ack", post(ack))
        .route("/events/:id/close", post(close))
        .route("/silences", get(silences).post(silence))
        .route("/checks", get(checks))
        .with_state(api)
}

fn failed(e: ConsoleError) -> Response {
    let status = match &e {
        ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
        ConsoleError::Request(_) => StatusCode::BAD_REQUEST,
        ConsoleError::Db { .. } | ConsoleError::Remote(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

fn answer<T: serde::Serialize>(result: Result<T, ConsoleError>) -> Response {
    match result {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => failed(e),
    }
}

async fn list(State(api): State<Api>, Query(filter): Query<Filter>) -> Response {
    answer(api.store.list(filter).await)
}

async fn one(State(api): State<Api>, UrlPath(id): UrlPath<i64>) -> Response {
    answer(api.store.get(id).await)
}

/// The body of an acknowledgement or a close.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Comment {
    comment: String,
}

async fn ack(
    State(api): State<Api>,
    Extension(Operator(who)): Extension<Operator>,
    UrlPath(id): UrlPath<i64>,
    Json(body): Json<Comment>,
) -> Response {
    change(api, "ack", who, id, body.comment).await
}

async fn close(
    State(api): State<Api>,
    Extension(Operator(who)): Extension<Operator>,
    UrlPath(id): UrlPath<i64>,
    Json(body): Json<Comment>,
) -> Response {
    change(api, "close", who, id, body.comment).await
}

async fn change(api: Api, action: &'static str, who: String, id: i64, comment: String) -> Response {
    let to = match action {
        "ack" => RowState::Acknowledged,
        _ => RowState::Closed,
    };
    let done = api.store.change(id, to, comment.clone(), who.clone()).await;
    if let Ok(row) = &done {
        tracing::info!(event = id, action, by = %who, "console change");
        api.announce(
            action,
            serde_json::json!({ "action": action, "by": who, "comment": comment, "event": row }),
        );
    }
    answer(done)
}

/// `GET /checks?agent=ID`.
#[derive(Debug, Deserialize)]
struct ChecksQuery {
    agent: String,
}

async fn checks(State(api): State<Api>, Query(q): Query<ChecksQuery>) -> Response {
    answer(api.store.checks(&q.agent).await)
}

async fn silences(State(api): State<Api>) -> Response {
    answer(api.store.silences(chrono::Utc::now()).await)
}

async fn silence(
    State(api): State<Api>,
    Extension(Operator(who)): Extension<Operator>,
    Json(body): Json<Silence>,
) -> Response {
    let done = api.store.silence(body, who.clone()).await;
    if let Ok(s) = &done {
        tracing::info!(silence = s.id, by = %who, "console silence");
        api.announce(
            "silence",
            serde_json::json!({ "action": "silence", "by": who, "silence": s }),
        );
    }
    answer(done)
}
