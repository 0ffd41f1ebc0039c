//! The health and metrics routes, served by [`crate::http::serve`].
//!
//! - `GET /healthz`: `200 ok` while the process serves requests.
//! - `GET /readyz`: `200` when every readiness check passes, else `503`;
//!   the body lists each check.
//! - `GET /metrics`: the Prometheus text exposition format.

use std::sync::Arc;

use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Reply, text};
use crate::{Health, Metrics};

/// What the routes read.
pub(crate) struct State {
    pub health: Health,
    pub metrics: Metrics,
}

/// Serves until `shutdown`, then closes open connections.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let handler = move |request: Request<_>| {
        let reply = route(&state, &request);
        async move { reply }
    };
    http::serve(listener, handler, shutdown, "Health server").await;
}

fn route<B>(state: &State, request: &Request<B>) -> Reply {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match request.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (ready, report) = state.health.report();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, report)
        }
        "/metrics" => http::reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.prometheus_text(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}
