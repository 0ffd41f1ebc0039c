//! The one HTTP serving stack of the workspace: HTTP/1.1 on hyper, a
//! handler per request, and a clean stop. The services' `/healthz`,
//! `/readyz` and `/metrics` (`server`) and `meshctl ui` are served by
//! [`serve`].

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A response whose body is held in memory, as [`serve`]'s handlers return.
pub type Reply = Response<Full<Bytes>>;

/// Serves HTTP/1.1 on `listener` until `shutdown`, answering each request
/// with `handler`; then closes the open connections and returns once they
/// are gone. `what` names the server in the debug logs of failed accepts
/// and connections (`"UI"`, `"Health server"`).
///
/// A handler's response body may be any hyper body ([`Reply`]'s in-memory
/// one, or a stream such as the MCP gateway's server-sent events).
pub async fn serve<H, F, B>(
    listener: TcpListener,
    handler: H,
    shutdown: CancellationToken,
    what: &'static str,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(%error, "{what} accept failed.");
                continue;
            }
        };
        // A response is written in pieces (the head, then the body or an
        // event stream's events): with Nagle's algorithm each later piece
        // waits for the client's delayed ACK, 40 ms on Linux.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "{what}: cannot set TCP_NODELAY.");
        }
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let reply = handler(request);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "{what} connection failed.");
                    }
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// A reply with `status`, the content type `content_type` and `body`.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A `text/plain; charset=utf-8` reply.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}
