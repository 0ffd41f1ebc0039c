//! Operating the agentmesh services: what `policy-worker`, `audit-sink` and
//! `gpu-scaler` share so that platform teams can run them like their other
//! services.
//!
//! - [`OpsConfig`]: the `--http-port`, `--log-format` and
//!   `--otlp-endpoint` flags (and their environment variables), flattened
//!   into each binary's arguments.
//! - [`service`]: the service skeleton, written once for every service
//!   ([`service::main`], [`Service`]: health server first, NATS with
//!   failover, the ready file, [`StartError`]).
//! - [`shutdown_on_signal`] and [`signal()`]: the SIGINT/SIGTERM handling of
//!   every service and of `meshctl`'s long-running commands.
//! - [`http`]: the one HTTP serving stack (hyper, HTTP/1.1), for the
//!   services' endpoints and `meshctl ui`.
//! - [`init_tracing`]: logs as text or JSON on stderr, and spans exported over
//!   OTLP/HTTP when an endpoint is set.
//! - [`Ops`]: the per-service bundle started by each `run`: [`Health`]
//!   (`/healthz`, `/readyz`), [`Metrics`] (OpenTelemetry instruments exported
//!   over OTLP when configured and always rendered as Prometheus text on
//!   `/metrics`) and the small HTTP server that serves them.
//! - The instruments of each service ([`WorkerMetrics`], [`SinkMetrics`],
//!   [`ScalerMetrics`], [`McpMetrics`], [`ConsumerLag`]) and its spans ([`spans`]), so the
//!   names in `docs/operations.md` are defined in one place.
//!
//! It is its own crate because all three binaries need the same plumbing and
//! none of it belongs to the event contract in `schemas`.

mod config;
mod env;
mod health;
pub mod http;
mod instruments;
mod logging;
mod metrics;
mod ops;
mod server;
pub mod service;
mod signal;
pub mod spans;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{LogFormat, OpsConfig};
pub use env::{UnknownEnv, check_env, check_names};
pub use health::{Health, ReadyFlag};
pub use instruments::{
    BatchCut, CacheMetrics, ConsumerLag, McpMetrics, NatsDurability, Published, ScalerMetrics,
    SinkMetrics, StreamLosses, TableMetrics, WorkerMetrics,
};
pub use logging::{TracingGuard, init_tracing};
pub use metrics::Metrics;
pub use ops::Ops;
pub use service::{Service, StartError};
pub use signal::{shutdown_on_signal, signal};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The health and metrics server could not bind its port.
    #[error(
        "cannot serve /healthz, /readyz and /metrics on `{addr}`: {source} (choose another port with --http-port or AGENTMESH_HTTP_PORT)"
    )]
    Bind {
        /// The address tried.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The OTLP exporter could not be built.
    #[error(
        "OTLP exporter for `{endpoint}`: {source} (check --otlp-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)"
    )]
    Exporter {
        /// The endpoint configured.
        endpoint: String,
        /// The exporter's error.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global tracing subscriber was already installed.
    #[error("logging was already initialised: {0}")]
    Subscriber(String),
}
