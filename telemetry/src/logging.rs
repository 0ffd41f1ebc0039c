//! The process-wide `tracing` subscriber of a service binary: log lines as
//! text or JSON on stderr (filtered by `RUST_LOG`, default `info`), and, with
//! an OTLP endpoint, the mesh's spans (target [`spans::TARGET`]) exported
//! over OTLP/HTTP in batches.
//!
//! The two outputs are filtered separately: log lines never carry the mesh's
//! spans or span events (they would repeat the fields every event line
//! already has), and `RUST_LOG=warn` does not switch tracing off.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::runtime;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::{Error, LogFormat, OpsConfig, spans};

/// Keeps the span exporter of [`init_tracing`]; flush it before exiting.
#[derive(Debug)]
#[must_use = "dropping the guard does not flush spans; call `shutdown`"]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans that ended so far (blocks on the exporter, so it
    /// runs off the async workers).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        }
    }

    /// Exports what is left and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = provider.force_flush();
                provider.shutdown()
            })
            .await;
        }
    }
}

/// The OpenTelemetry resource of a service process: `service.name` (or
/// `OTEL_SERVICE_NAME`), a `service.instance.id` unique to the process, and
/// `OTEL_RESOURCE_ATTRIBUTES`.
pub(crate) fn resource(service: &'static str) -> Resource {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    let instance = INSTANCE.get_or_init(|| uuid::Uuid::new_v4().to_string());
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.instance.id", instance.clone()))
        .with_attribute(KeyValue::new("service.namespace", "agentmesh"));
    match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.is_empty() => builder,
        _ => builder.with_service_name(service),
    }
    .build()
}

/// Installs the global subscriber of a service binary. Call it once, early,
/// inside the Tokio runtime; keep the guard and `shutdown` it on exit.
pub fn init_tracing(service: &'static str, config: &OpsConfig) -> Result<TracingGuard, Error> {
    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Log lines only: the mesh's spans (and their events) are for the trace backend.
    let not_mesh_spans = filter_fn(|meta| meta.target() != spans::TARGET);
    let logs = match config.log_format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(env_filter.and(not_mesh_spans))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(env_filter.and(not_mesh_spans))
            .boxed(),
    };

    let (otel, provider) = match config.otlp_signal_url("traces") {
        Some(url) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url.clone())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build()
                .map_err(|source| Error::Exporter {
                    endpoint: url,
                    source,
                })?;
            let processor =
                opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    runtime::Tokio,
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_resource(resource(service))
                .with_span_processor(processor)
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(Targets::new().with_target(spans::TARGET, LevelFilter::INFO));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let registry = tracing_subscriber::registry().with(logs);
    match otel {
        Some(otel) => registry.with(otel).try_init(),
        // Without an exporter nothing reads the mesh's spans: a global
        // filter disables them, so the per-event helpers in `spans` return
        // at once instead of the registry storing a span per event that no
        // layer records (an absent layer counts as "interested in all").
        None => registry
            .with(filter_fn(|meta| meta.target() != spans::TARGET))
            .try_init(),
    }
    .map_err(|e| Error::Subscriber(e.to_string()))?;
    Ok(TracingGuard { provider })
}
