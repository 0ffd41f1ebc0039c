//! The HTTP side: HTTP/1.1 on hyper, `/mcp` only. Each request is
//! authenticated here (`auth`) before MCP sees it: without a valid bearer
//! token it is answered `401` with a JSON-RPC error body and a
//! `WWW-Authenticate` challenge; with one, the caller rides in the request's
//! extensions into rmcp's Streamable HTTP service, which hands them to the
//! session's handler. A body over `--max-body-bytes` is refused with `413`
//! before it is read (by `Content-Length`) or while it is; one that is not
//! JSON-RPC with `400` and a JSON-RPC error (`-32700`, `-32600`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::session::{Gateway, Session};
use crate::{Config, MCP_PATH};

/// rmcp's Streamable HTTP service over the gateway's sessions.
pub(crate) type Mcp = StreamableHttpService<Session, LocalSessionManager>;

type Body = BoxBody<Bytes, Infallible>;

/// The MCP service: one [`Session`] per MCP session (or per request for a
/// stateless client).
pub(crate) fn mcp_service(gw: Arc<Gateway>, config: &Config, shutdown: CancellationToken) -> Mcp {
    let mut http = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown.child_token())
        .with_max_request_body_bytes(config.max_body_bytes);
    if config.allowed_hosts.iter().any(|h| h == "*") {
        http = http.disable_allowed_hosts();
    } else if !config.allowed_hosts.is_empty() {
        http = http.with_allowed_hosts(config.allowed_hosts.clone());
    }
    StreamableHttpService::new(
        move || Ok(Session::new(gw.clone())),
        Arc::new(LocalSessionManager::default()),
        http,
    )
}

/// What the HTTP layer checks before MCP, and where it counts refusals.
#[derive(Clone)]
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub metrics: telemetry::McpMetrics,
}

/// Serves until `shutdown` on the workspace's one HTTP stack
/// (`telemetry::http::serve`), then closes open connections.
pub(crate) async fn serve(
    listener: TcpListener,
    mcp: Mcp,
    auth: Arc<Auth>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let handler = move |request| {
        let (mcp, auth, limits) = (mcp.clone(), auth.clone(), limits.clone());
        async move { handle(&mcp, &auth, &limits, request).await }
    };
    telemetry::http::serve(listener, handler, shutdown, "MCP").await;
}

async fn handle(
    mcp: &Mcp,
    auth: &Auth,
    limits: &Limits,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let max_body_bytes = limits.max_body_bytes;
    if request.uri().path() != MCP_PATH {
        limits.metrics.refused("not_found");
        return error(
            StatusCode::NOT_FOUND,
            -32600,
            &format!(
                "no MCP endpoint at `{}`: use `{MCP_PATH}`",
                request.uri().path()
            ),
        );
    }
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("invalid"));
    let caller = match auth.authenticate(authorization) {
        Ok(caller) => caller,
        Err(refusal) => {
            tracing::info!(reason = refusal.message(), "Request refused.");
            limits.metrics.refused("unauthorized");
            let mut response = error(StatusCode::UNAUTHORIZED, -32001, refusal.message());
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(refusal.challenge()),
            );
            return response;
        }
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Past the limit a body is still read (and dropped) up to DRAIN_BYTES
    // more, so the client reads the 413 rather than a reset connection;
    // beyond that the connection is cut at once.
    if declared.is_some_and(|n| n > (max_body_bytes + DRAIN_BYTES) as u64) {
        limits.metrics.refused("too_large");
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            -32600,
            &format!(
                "request body of {} bytes is over the gateway's limit of {max_body_bytes} (--max-body-bytes); a mesh event is at most 1 MiB",
                declared.unwrap_or_default()
            ),
        );
    }
    request.extensions_mut().insert(caller);
    if request.method() != Method::POST {
        // The SSE stream (GET) and session end (DELETE): no body to check.
        return mcp.handle(request).await;
    }
    // A POST body is read here, within the limit, and checked to be
    // JSON-RPC, so that a bad one gets a JSON-RPC error (rmcp would answer
    // `415` in plain text); the same bytes then go to rmcp.
    let (parts, body) = request.into_parts();
    let bytes = match read_body(body, max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(Some(size)) => {
            limits.metrics.refused("too_large");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                -32600,
                &format!(
                    "request body of {size} bytes or more is over the gateway's limit of {max_body_bytes} (--max-body-bytes); a mesh event is at most 1 MiB"
                ),
            );
        }
        Err(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                -32700,
                "the request body could not be read",
            );
        }
    };
    if let Err((code, message)) = check_json_rpc(&bytes) {
        limits.metrics.refused("malformed");
        return error(StatusCode::BAD_REQUEST, code, &message);
    }
    mcp.handle(Request::from_parts(parts, Full::new(bytes)))
        .await
}

/// How much of a body past the limit is read and dropped before the 413.
const DRAIN_BYTES: usize = 32 * 1024 * 1024;

/// The body, when it is at most `max` bytes. `Err(Some(n))`: it is larger
/// (`n` bytes were read, at most `max` + [`DRAIN_BYTES`]); `Err(None)`: it
/// could not be read.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, Option<usize>> {
    let mut kept = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| None)?.into_data() else {
            continue;
        };
        total += data.len();
        if total <= max {
            kept.extend_from_slice(&data);
        } else if total > max + DRAIN_BYTES {
            return Err(Some(total));
        }
    }
    if total > max {
        Err(Some(total))
    } else {
        Ok(kept.freeze())
    }
}

/// Whether `body` is a JSON-RPC 2.0 message (or a batch of them): `Err`
/// with the JSON-RPC error code (`-32700` parse error, `-32600` invalid
/// request) and a message that says what is wrong.
fn check_json_rpc(body: &[u8]) -> Result<(), (i32, String)> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| (-32700, format!("parse error: the body is not JSON ({e})")))?;
    let one = |m: &serde_json::Value| {
        m.as_object()
            .is_some_and(|o| o.get("jsonrpc").and_then(|v| v.as_str()) == Some("2.0"))
    };
    let valid = match &value {
        serde_json::Value::Array(batch) => !batch.is_empty() && batch.iter().all(one),
        message => one(message),
    };
    if valid {
        Ok(())
    } else {
        Err((
            -32600,
            "invalid request: the body is JSON but no JSON-RPC 2.0 message (an object with \"jsonrpc\": \"2.0\")".to_owned(),
        ))
    }
}

/// A JSON-RPC error response without an id, with `status`.
fn error(status: StatusCode, code: i32, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": code, "message": message},
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_json_rpc_or_refused_with_the_json_rpc_code() {
        let ok = [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,
        ];
        for body in ok {
            assert_eq!(check_json_rpc(body.as_bytes()), Ok(()), "{body}");
        }
        for (body, code) in [
            ("{this is not json", -32700),
            ("", -32700),
            (r#"{"id":1,"method":"tools/list"}"#, -32600),
            (r#"{"jsonrpc":"1.0","id":1}"#, -32600),
            ("[]", -32600),
            ("42", -32600),
        ] {
            let err = check_json_rpc(body.as_bytes()).unwrap_err();
            assert_eq!(err.0, code, "{body}: {}", err.1);
        }
    }
}
