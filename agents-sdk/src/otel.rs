//! OpenTelemetry spans per step, exported over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! or [`AgentBuilder::otlp_endpoint`](crate::AgentBuilder::otlp_endpoint))
//! is set; without one nothing here runs.
//!
//! A step's span *is* the span its event's `traceparent` names: the same
//! trace id (the workflow) and span id. Its parent is the span of the event
//! it follows (the agent's previous step, or the delivery, call or answer it
//! follows), none for a workflow's first step. The policy worker's
//! `policy.decision` span is a child of the event's `traceparent`, so a trace
//! backend shows planner step → worker decision, and the coder's steps under
//! the planner's, as one tree. The Python SDK does the same. Attributes
//! follow the OpenTelemetry GenAI conventions where they apply
//! (`gen_ai.operation.name`, `gen_ai.agent.name`, `gen_ai.tool.name`,
//! `gen_ai.tool.call.id`).

use std::cell::Cell;
use std::time::Duration;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider,
    span_processor_with_async_runtime::BatchSpanProcessor,
};
use schemas::{AttributesReader, Event, EventType, TraceParent};

thread_local! {
    /// The ids of the span being started: those of the event's `traceparent`.
    static NEXT: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Hands out the ids set in [`NEXT`] (random ones otherwise).
#[derive(Debug, Default)]
struct StepIds(RandomIdGenerator);

impl IdGenerator for StepIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT.with(Cell::get)
            .map_or_else(|| self.0.new_trace_id(), |(trace, _)| trace)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT.with(Cell::get)
            .map_or_else(|| self.0.new_span_id(), |(_, span)| span)
    }
}

/// An agent's exporter of step spans.
#[derive(Debug)]
pub(crate) struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Drop for Tracing {
    /// Shuts the exporter down off the async workers: the provider's
    /// shutdown blocks until the batch task (on this runtime) answers.
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let tracer = self.tracer.clone();
        let _ = std::thread::Builder::new()
            .name("agentmesh-otel-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown();
                drop(tracer);
            });
    }
}

/// The OTLP traces URL: `endpoint` (a base URL) given, else the
/// environment's.
fn traces_url(endpoint: Option<&str>) -> Option<String> {
    let base = |url: &str| format!("{}/v1/traces", url.trim_end_matches('/'));
    if let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) {
        return Some(base(endpoint));
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| base(&e)))
}

impl Tracing {
    /// The exporter of agent `agent`, when an endpoint is configured.
    pub(crate) fn start(agent: &str, endpoint: Option<&str>) -> Option<Self> {
        let url = traces_url(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build();
        let exporter = match exporter {
            Ok(exporter) => exporter,
            Err(e) => {
                tracing::warn!(%url, error = %e, "Cannot export step spans over OTLP; going on without.");
                return None;
            }
        };
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(batch)
            .build();
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("agentmesh-agent-{agent}"));
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name(service)
                    .with_attribute(KeyValue::new("service.namespace", "agentmesh"))
                    .build(),
            )
            .with_id_generator(StepIds::default())
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("agents-sdk");
        Some(Self { provider, tracer })
    }

    /// Starts the span of `event`, published by `agent` on `subject`: ids
    /// from `trace` (the event's `traceparent`), parent `parent`. It ends
    /// when dropped.
    pub(crate) fn step(
        &self,
        agent: &str,
        subject: &str,
        event: &Event,
        event_type: EventType,
        trace: TraceParent,
        parent: Option<TraceParent>,
    ) -> opentelemetry_sdk::trace::Span {
        let short = event_type.short_name();
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", operation(event_type)),
            KeyValue::new("gen_ai.agent.name", agent.to_owned()),
            KeyValue::new("gen_ai.agent.id", agent.to_owned()),
            KeyValue::new("agentmesh.event.id", event.id().to_owned()),
            KeyValue::new("agentmesh.event.type", event_type.as_str()),
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.destination.name", subject.to_owned()),
        ];
        if matches!(event_type, EventType::ToolCall | EventType::ToolResult)
            && let Some(tool) = event.subject()
        {
            attributes.push(KeyValue::new("gen_ai.tool.name", tool.to_owned()));
            let call_id = match event_type {
                EventType::ToolResult => extension(event, schemas::ext::CAUSATIONID),
                _ => Some(event.id().to_owned()),
            };
            if let Some(call_id) = call_id {
                attributes.push(KeyValue::new("gen_ai.tool.call.id", call_id));
            }
        }
        if let Some(target) = extension(event, schemas::ext::TARGET) {
            attributes.push(KeyValue::new("agentmesh.target", target));
        }
        let context = match parent {
            Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(parent.trace_id),
                SpanId::from_bytes(parent.parent_id),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let builder = self
            .tracer
            .span_builder(format!("{short} {agent}"))
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes);
        NEXT.with(|next| {
            next.set(Some((
                TraceId::from_bytes(trace.trace_id),
                SpanId::from_bytes(trace.parent_id),
            )));
        });
        let mut span = self.tracer.build_with_context(builder, &context);
        NEXT.with(|next| next.set(None));
        span.set_attribute(KeyValue::new("agentmesh.trace_id", trace.trace_id_hex()));
        span
    }

    /// Exports what is buffered (off the async workers: the flush blocks
    /// until the batch task answers).
    pub(crate) async fn flush(&self) {
        let provider = self.provider.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || provider.force_flush()).await {
            tracing::debug!(error = %e, "Could not flush the step spans.");
        }
    }
}

/// An extension attribute as text.
fn extension(event: &Event, name: &str) -> Option<String> {
    event.extension(name).map(ToString::to_string)
}

/// `gen_ai.operation.name` of a step.
fn operation(event_type: EventType) -> &'static str {
    match event_type {
        EventType::ToolCall | EventType::ToolResult => "execute_tool",
        _ => "invoke_agent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_is_the_base_plus_v1_traces() {
        assert_eq!(
            traces_url(Some("http://127.0.0.1:4318/")).as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(operation(EventType::ToolCall), "execute_tool");
        assert_eq!(operation(EventType::TaskHandoff), "invoke_agent");
    }
}
