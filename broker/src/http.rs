//! The admin HTTP listener (plain HTTP, meant for loopback or a monitoring network):
//!
//! - `GET /metrics`: Prometheus text exposition of [`crate::metrics`];
//! - `GET /healthz`: `200 ok` while the process serves HTTP at all (liveness);
//! - `GET /readyz`: `200 ready`, or `503` with the reason: the store refuses writes,
//!   the disk is below the reserve, or the broker is shutting down;
//! - the operator dashboard (`GET /`) and its JSON under `/api` (see `crate::dashboard`),
//!   its data behind the operator bearer token when `BrokerConfig::admin_token` is set.
//!
//! It is started after the gRPC listener is bound and stops when shutdown begins.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::Shared;
use crate::dashboard;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    // The page and its assets hold no data and stay open (a browser cannot add a header
    // to a page load); the data under /api needs the operator token when one is set.
    let api = Router::new()
        .route("/api/queues", get(dashboard::queues))
        .route("/api/agencies/{code}/pending", get(dashboard::pending))
        .route(
            "/api/agencies/{code}/dead-letters",
            get(dashboard::dead_letters),
        )
        .route("/api/messages/{id}", get(dashboard::message))
        .route("/api/redrive", post(dashboard::redrive))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            dashboard::require_token,
        ));
    Router::new()
        .merge(api)
        .route("/", get(dashboard::index))
        .route("/app.js", get(dashboard::app_js))
        .route("/style.css", get(dashboard::style_css))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    // The state metrics read the store and walk its directory: off the async threads.
    let encoded = tokio::task::spawn_blocking(move || {
        let mut body = String::new();
        shared.metrics.encode(&mut body).map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Ok(Err(_)) | Err(_) => {
            tracing::error!("cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics",
            )
                .into_response()
        }
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match tokio::task::spawn_blocking(move || crate::not_ready_reason(&shared)).await {
        Ok(None) => (StatusCode::OK, "ready").into_response(),
        Ok(Some(reason)) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "readiness check failed").into_response(),
    }
}
