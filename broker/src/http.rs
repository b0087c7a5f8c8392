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
//!
//! Every request passes [`guard`] first: its `Host` must name the bound address or
//! `localhost` with the bound port (a DNS-rebinding page cannot reach the listener), a
//! cross-site browser request (`Sec-Fetch-Site: cross-site`) is refused, and every
//! response carries `Content-Security-Policy: frame-ancestors 'none'` and
//! `X-Frame-Options: DENY` (no clickjacking of the redrive button). Connection caps and
//! timeouts are in `crate::listener`. The listener speaks plain HTTP, so it binds only to
//! loopback unless `admin_insecure_bind` says otherwise ([`check_bind`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::Shared;
use crate::dashboard;
use crate::error::BrokerError;

/// Refuses a non-loopback admin address unless the operator said so explicitly: the
/// listener is plain HTTP and carries the operator token and the dashboard's data. An
/// explicit insecure bind is logged as a warning and still needs a token.
pub(crate) fn check_bind(
    addr: SocketAddr,
    insecure_bind: bool,
    has_token: bool,
) -> Result<(), BrokerError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if insecure_bind && !has_token {
        return Err(BrokerError::Config {
            path: "admin_listen".into(),
            detail: format!(
                "{addr} is not a loopback address: the dashboard's data and redrive need an \
                 operator token there (--admin-token-file)"
            ),
        });
    }
    if !insecure_bind {
        return Err(BrokerError::Config {
            path: "admin_listen".into(),
            detail: format!(
                "{addr} is not a loopback address and the admin listener speaks plain HTTP; \
                 bind it to 127.0.0.1 (and reach it through an SSH tunnel or a TLS proxy), or \
                 pass --admin-insecure-bind to accept the risk"
            ),
        });
    }
    tracing::warn!(
        %addr,
        "the admin listener is bound off loopback without TLS (--admin-insecure-bind): the \
         operator token and the dashboard's data cross the network in clear"
    );
    Ok(())
}

/// The `Host` values accepted for a listener bound to `bound`.
#[derive(Debug, Clone)]
pub(crate) struct AllowedHost {
    bound: SocketAddr,
}

impl AllowedHost {
    /// `localhost` or the bound IP (any IP literal when bound to all addresses), with
    /// the bound port; a request without a port names port 80.
    fn allows(&self, host: &str) -> bool {
        let (name, port) = split_host(host);
        let port = match port {
            Some(p) => p.parse::<u16>().ok(),
            None => Some(80),
        };
        if port != Some(self.bound.port()) {
            return false;
        }
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let name = name.trim_start_matches('[').trim_end_matches(']');
        match name.parse::<IpAddr>() {
            Ok(ip) => ip == self.bound.ip() || self.bound.ip().is_unspecified(),
            Err(_) => false,
        }
    }
}

/// `host[:port]`, IPv6 literals in brackets.
fn split_host(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.rsplit_once("]:") {
            Some((name, port)) => (name.trim_start_matches('['), Some(port)),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}

/// The checks and headers every admin request and response gets (see the module doc).
pub(crate) async fn guard(
    State(allowed): State<Arc<AllowedHost>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let refusal = if !allowed.allows(host) {
        Some(format!(
            "Host {:?} is not this listener; use http://{} or http://localhost:{}",
            lienthong_proto::agency::printable(host),
            allowed.bound,
            allowed.bound.port()
        ))
    } else if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        Some("cross-site requests are refused".to_owned())
    } else {
        None
    };
    let mut response = match refusal {
        Some(reason) => {
            tracing::debug!(%reason, "admin request refused");
            (StatusCode::FORBIDDEN, reason).into_response()
        }
        None => next.run(request).await,
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

pub(crate) fn router(shared: Arc<Shared>, bound: SocketAddr) -> Router {
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
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(AllowedHost { bound }),
            guard,
        ))
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

#[cfg(test)]
mod tests {
    use super::AllowedHost;

    #[test]
    fn host_must_name_the_bound_address_or_localhost() {
        let loopback = AllowedHost {
            bound: "127.0.0.1:9443".parse().unwrap_or_else(|_| unreachable!()),
        };
        for ok in ["127.0.0.1:9443", "localhost:9443", "LOCALHOST:9443"] {
            assert!(loopback.allows(ok), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:9444",
            "evil.example:9443",
            "localhost.evil.example:9443",
            "10.0.0.1:9443",
            "127.0.0.1:x",
            "[::1]:9443",
        ] {
            assert!(!loopback.allows(bad), "{bad}");
        }
        let any = AllowedHost {
            bound: "0.0.0.0:80".parse().unwrap_or_else(|_| unreachable!()),
        };
        assert!(any.allows("10.1.2.3"));
        assert!(any.allows("10.1.2.3:80"));
        assert!(!any.allows("rebound.example"));
        let v6 = AllowedHost {
            bound: "[::1]:9443".parse().unwrap_or_else(|_| unreachable!()),
        };
        assert!(v6.allows("[::1]:9443"));
        assert!(!v6.allows("[::2]:9443"));
    }
}
