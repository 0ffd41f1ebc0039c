//! What telemetry adds to one event on the policy worker's hot path:
//! recording its metrics (bound instruments), and its decision and delivery
//! spans with tracing off (the default) and on (spans built, not exported).
//!
//! `cargo bench -p telemetry --bench hot_path`

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry::trace::TracerProvider as _;
use schemas::{Decision, TraceParent};
use telemetry::{Metrics, Published, WorkerMetrics, spans};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, filter};

fn event_spans(tp: &TraceParent) {
    let span = spans::decision("mesh.ingress.planner.handoff");
    spans::join(&span, tp, None);
    spans::record_decision(
        &span,
        "e-1",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "allow",
        "hash",
    );
    let delivery = spans::delivery(&span);
    drop(delivery);
    drop(span);
}

/// The production log layer: fmt to stderr (here a sink), mesh spans left out.
fn logs<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(filter::filter_fn(|m| m.target() != spans::TARGET))
}

fn bench(c: &mut Criterion) {
    let metrics = Metrics::local("bench");
    let worker = WorkerMetrics::new(&metrics);
    c.bench_function("worker metrics per event", |b| {
        b.iter(|| {
            worker.received();
            worker.decided(Decision::Allow, Duration::from_micros(30));
            worker.published(Published::Delivery);
        })
    });

    let tp = TraceParent::mint();
    let off = tracing_subscriber::registry().with(logs());
    tracing::subscriber::with_default(off, || {
        c.bench_function("decision + delivery spans, tracing off", |b| {
            b.iter(|| event_spans(&tp))
        });
    });

    // Spans built and ended; no processor, so nothing is exported.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let on = tracing_subscriber::registry().with(logs()).with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("bench"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(filter::Targets::new().with_target(spans::TARGET, tracing::Level::INFO)),
    );
    tracing::subscriber::with_default(on, || {
        c.bench_function("decision + delivery spans, tracing on", |b| {
            b.iter(|| event_spans(&tp))
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
