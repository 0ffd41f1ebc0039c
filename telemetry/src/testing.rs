//! Test helpers (feature `testing`): an OTLP/HTTP receiver that decodes
//! what the services export, and a bare HTTP GET for the health server.
//!
//! The receiver accepts `POST /v1/traces` and `POST /v1/metrics` in the
//! protobuf encoding (what `--otlp-endpoint` sends) and keeps every span and
//! metric point it was sent, for tests to assert on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// One span as the receiver got it; ids in lowercase hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting resource.
    pub service: String,
    /// The span name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, or empty for a root span.
    pub parent_span_id: String,
    /// Attributes, values rendered as strings.
    pub attributes: BTreeMap<String, String>,
    /// Links as (trace id, span id).
    pub links: Vec<(String, String)>,
    /// Span events: name and attributes.
    pub events: Vec<(String, BTreeMap<String, String>)>,
}

/// One metric data point as the receiver got it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedPoint {
    /// `service.name` of the exporting resource.
    pub service: String,
    /// The instrument name.
    pub metric: String,
    /// The point's attributes.
    pub attributes: BTreeMap<String, String>,
    /// The value of a sum or gauge; the count of a histogram.
    pub value: f64,
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    points: Vec<ReceivedPoint>,
}

/// An OTLP/HTTP receiver on a free local port; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    stop: CancellationToken,
}

impl OtlpReceiver {
    /// Starts the receiver.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = CancellationToken::new();
        let state = received.clone();
        let handler = move |request| {
            let state = state.clone();
            async move { handle(&state, request).await }
        };
        tokio::spawn(crate::http::serve(
            listener,
            handler,
            stop.clone(),
            "OTLP receiver",
        ));
        Ok(Self {
            addr,
            received,
            stop,
        })
    }

    /// The base URL to give as `--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .lock()
            .map(|r| r.spans.clone())
            .unwrap_or_default()
    }

    /// Every metric point received so far.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.received
            .lock()
            .map(|r| r.points.clone())
            .unwrap_or_default()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(
    state: &Mutex<Received>,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    let decoded = match path.as_str() {
        "/v1/traces" => ExportTraceServiceRequest::decode(body).map(|req| {
            if let Ok(mut r) = state.lock() {
                r.spans.extend(spans(req));
            }
        }),
        "/v1/metrics" => ExportMetricsServiceRequest::decode(body).map(|req| {
            if let Ok(mut r) = state.lock() {
                r.points.extend(points(req));
            }
        }),
        _ => return status(StatusCode::NOT_FOUND),
    };
    match decoded {
        Ok(()) => {
            let mut response = status(StatusCode::OK);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-protobuf"),
            );
            response
        }
        Err(_) => status(StatusCode::BAD_REQUEST),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
        .collect()
}

fn service(resource: Option<&Resource>) -> String {
    resource
        .map(|r| attributes(&r.attributes))
        .and_then(|mut a| a.remove("service.name"))
        .unwrap_or_default()
}

fn spans(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = service(rs.resource.as_ref());
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    events: span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attributes(&e.attributes)))
                        .collect(),
                });
            }
        }
    }
    out
}

fn points(request: ExportMetricsServiceRequest) -> Vec<ReceivedPoint> {
    let number = |v: Option<&number_data_point::Value>| match v {
        Some(number_data_point::Value::AsDouble(d)) => *d,
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        None => 0.0,
    };
    let mut out = Vec::new();
    for rm in request.resource_metrics {
        let service = service(rm.resource.as_ref());
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let mut push = |attrs: &[KeyValue], value: f64| {
                    out.push(ReceivedPoint {
                        service: service.clone(),
                        metric: m.name.clone(),
                        attributes: attributes(attrs),
                        value,
                    })
                };
                match &m.data {
                    Some(metric::Data::Sum(sum)) => {
                        for p in &sum.data_points {
                            push(&p.attributes, number(p.value.as_ref()));
                        }
                    }
                    Some(metric::Data::Gauge(gauge)) => {
                        for p in &gauge.data_points {
                            push(&p.attributes, number(p.value.as_ref()));
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            push(&p.attributes, p.count as f64);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// `GET path` on `addr` over a fresh connection: the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let invalid = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP response: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(invalid)?;
    Ok((code, body.to_owned()))
}
