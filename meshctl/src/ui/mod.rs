//! `meshctl ui`: a small web app over the audit tables — recent traces,
//! each trace's decision tree (kept current while the page is open), and
//! denials. HTML is rendered on the server; the only script is the
//! embedded `live.js`, which polls `/api/trace/<id>` and swaps in the
//! re-rendered tree when it changed. It reads ClickHouse as meshctl does
//! (the read-only user on a local stack with authorization) and serves
//! HTTP/1.1 with the services' stack (`telemetry::http`), on 127.0.0.1
//! unless told otherwise.
//!
//! Routes: `/` (traces; `agent`, `decision`, `since`, `until`, `limit`),
//! `/trace/<id>`, `/trace/<id>/tree` (the fragment), `/api/trace/<id>`
//! (JSON), `/denials` (`agent`, `since`, `until`), `/assets/*`.

mod data;
mod filter;
mod html;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::{CACHE_CONTROL, HeaderValue};
use hyper::{Method, Request, StatusCode};
use telemetry::http::Reply;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::servers::Endpoints;

const STYLE: &str = include_str!("style.css");
const LIVE: &str = include_str!("live.js");

/// Why a page could not be served: each becomes an error page with its
/// HTTP status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PageError {
    /// Malformed input: a filter, a trace id (400).
    #[error("{0}")]
    BadRequest(String),
    /// Nothing there (404).
    #[error("{0}")]
    NotFound(String),
    /// Not a GET (405).
    #[error("{0}")]
    Method(String),
    /// ClickHouse does not answer (503).
    #[error("{0}")]
    Unavailable(String),
    /// ClickHouse answered with an error (502).
    #[error("{0}")]
    Upstream(String),
    /// A bug of ours (500).
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl PageError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What every request reads.
struct State {
    audit: data::Audit,
    database: String,
}

/// Serves the UI on `addr` until `shutdown`; prints the URL once listening.
pub(crate) async fn run(
    endpoints: &Endpoints,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e} (pick another with `--port`)")
    })?;
    let local = listener.local_addr()?;
    let state = Arc::new(State {
        audit: data::Audit::new(endpoints.audit_db(), endpoints.clickhouse_url.clone()),
        database: endpoints.database.clone(),
    });
    outln!(
        "Serving http://{local}/ : the audit of `{}` at {} (Ctrl-C stops it)",
        endpoints.database,
        endpoints.clickhouse_url
    );
    let handler = move |request: Request<_>| {
        let state = state.clone();
        async move { respond(&state, &request).await }
    };
    telemetry::http::serve(listener, handler, shutdown, "UI").await;
    Ok(())
}

/// A response body and its content type.
struct Body(&'static str, String);

fn html(page: String) -> Body {
    Body("text/html; charset=utf-8", page)
}

async fn respond<B>(state: &State, request: &Request<B>) -> Reply {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let result = if request.method() == Method::GET || request.method() == Method::HEAD {
        route(state, &path, &query).await
    } else {
        Err(PageError::Method(format!(
            "{} is not served here: the UI only reads (GET)",
            request.method()
        )))
    };
    let (status, body) = match result {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => {
            let status = e.status();
            tracing::debug!(%path, %status, error = %e, "UI request failed.");
            let body = if path.starts_with("/api/") {
                let json = serde_json::json!({ "error": e.to_string() });
                Body("application/json", json.to_string())
            } else {
                html(pages::error(status, &e.to_string()))
            };
            (status, body)
        }
    };
    let mut response = telemetry::http::reply(status, body.0, body.1);
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // Defence in depth beside escaping: no inline or foreign script runs.
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    response
}

async fn route(state: &State, path: &str, query: &str) -> Result<Body, PageError> {
    let now = chrono::Utc::now();
    match path {
        "/" => {
            let filter = filter::TraceFilter::parse(query, now)?;
            let rows = state.audit.traces(&filter).await?;
            Ok(html(pages::traces(&filter, &rows)))
        }
        "/denials" => {
            let filter = filter::DenialFilter::parse(query, now)?;
            let mut rows = state.audit.denials(&filter.window).await?;
            if let Some(agent) = &filter.agent {
                rows.retain(|r| &r.agent == agent);
            }
            Ok(html(pages::denials(&filter, &rows)))
        }
        "/assets/style.css" => Ok(Body("text/css; charset=utf-8", STYLE.to_owned())),
        "/assets/live.js" => Ok(Body("text/javascript; charset=utf-8", LIVE.to_owned())),
        _ => trace_route(state, path).await,
    }
}

async fn trace_route(state: &State, path: &str) -> Result<Body, PageError> {
    let (api, rest) = match path.strip_prefix("/api/trace/") {
        Some(rest) => (true, rest),
        None => match path.strip_prefix("/trace/") {
            Some(rest) => (false, rest),
            None => return Err(PageError::NotFound(format!("no page at `{path}`"))),
        },
    };
    let (trace_id, fragment) = match rest.strip_suffix("/tree") {
        Some(id) if !api => (id, true),
        _ => (rest, false),
    };
    crate::tree::check_trace_id(trace_id).map_err(|e| PageError::BadRequest(e.to_string()))?;
    let missing = || {
        PageError::NotFound(format!(
            "no steps of trace {trace_id} in `{}.events`",
            state.database
        ))
    };
    if api {
        let nodes = state.audit.steps(trace_id).await?;
        if nodes.is_empty() {
            return Err(missing());
        }
        let state = serde_json::json!({
            "trace_id": trace_id,
            "steps": nodes.len(),
            "decided": nodes.iter().filter(|n| !n.decision.is_empty()).count(),
            "denied": nodes.iter().filter(|n| n.decision == "deny").count(),
            "digest": pages::digest(&nodes),
        });
        return Ok(Body("application/json", state.to_string()));
    }
    let trace = state.audit.trace(trace_id).await?;
    if trace.nodes.is_empty() {
        return Err(missing());
    }
    Ok(html(if fragment {
        pages::tree_fragment(&trace)
    } else {
        pages::trace(trace_id, &trace)
    }))
}
