//! One OpenTelemetry meter provider per service instance, read two ways: a
//! manual reader renders the Prometheus text exposition format for
//! `/metrics` on every scrape, and, when an OTLP endpoint is configured, a
//! periodic reader pushes the same instruments over OTLP/HTTP.
//!
//! Per instance rather than global, so that two replicas started in one
//! process (as tests do) count their own work.

use std::fmt::Write;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::runtime;

use crate::{Error, OpsConfig};

/// The instruments of one service instance and their readers.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: SdkMeterProvider,
    prometheus: Arc<ManualReader>,
    meter: Meter,
}

/// Lets the provider own a reader that `/metrics` also holds.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

impl Metrics {
    /// Instruments for `service`, exported over OTLP when `config` names an
    /// endpoint. Must be called inside a Tokio runtime when it does.
    pub fn new(service: &'static str, config: &OpsConfig) -> Result<Self, Error> {
        let prometheus = Arc::new(ManualReader::builder().build());
        let mut builder = SdkMeterProvider::builder()
            .with_resource(crate::logging::resource(service))
            .with_reader(SharedReader(prometheus.clone()));
        if let Some(url) = config.otlp_signal_url("metrics") {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(url.clone())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build()
                .map_err(|source| Error::Exporter {
                    endpoint: url,
                    source,
                })?;
            let reader = opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                exporter,
                runtime::Tokio,
            )
            .with_interval(config.metrics_interval())
            .build();
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        let meter = provider.meter(service);
        Ok(Self {
            inner: Arc::new(Inner {
                provider,
                prometheus,
                meter,
            }),
        })
    }

    /// Metrics for tests and tools: Prometheus text only.
    pub fn local(service: &'static str) -> Self {
        match Self::new(service, &OpsConfig::default()) {
            Ok(metrics) => metrics,
            // INVARIANT: without an OTLP endpoint nothing can fail.
            Err(_) => unreachable!("metrics without an exporter cannot fail"),
        }
    }

    /// The meter to create instruments from.
    pub fn meter(&self) -> &Meter {
        &self.inner.meter
    }

    /// Every instrument in the Prometheus text exposition format (0.0.4).
    pub fn prometheus_text(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(error) = self.inner.prometheus.collect(&mut rm) {
            return format!("# collection failed: {error}\n");
        }
        render(&rm)
    }

    /// Exports what the periodic reader has not yet sent, then stops the
    /// readers. Blocks on the exporter, so it runs off the async workers.
    pub async fn shutdown(&self) {
        let provider = self.inner.provider.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        })
        .await;
    }
}

/// The Prometheus name of an OpenTelemetry instrument: dots become
/// underscores, the unit becomes a suffix, counters end in `_total`.
pub(crate) fn prometheus_name(name: &str, unit: &str, monotonic_sum: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    let suffix = match unit {
        "s" => "_seconds",
        "ms" => "_milliseconds",
        "By" => "_bytes",
        _ => "",
    };
    if !suffix.is_empty() && !out.ends_with(suffix) {
        out.push_str(suffix);
    }
    if monotonic_sum {
        out.push_str("_total");
    }
    out
}

fn render(rm: &ResourceMetrics) -> String {
    let mut out = String::with_capacity(4096);
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::F64(data) => family(&mut out, metric, data),
                AggregatedMetrics::U64(data) => family(&mut out, metric, data),
                AggregatedMetrics::I64(data) => family(&mut out, metric, data),
            }
        }
    }
    out
}

/// A number as Prometheus writes it.
trait Sample: Copy {
    fn write(self, out: &mut String);
}

impl Sample for u64 {
    fn write(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Sample for i64 {
    fn write(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Sample for f64 {
    fn write(self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

fn family<T: Sample>(
    out: &mut String,
    metric: &opentelemetry_sdk::metrics::data::Metric,
    data: &MetricData<T>,
) {
    let (kind, monotonic) = match data {
        MetricData::Sum(sum) if sum.is_monotonic() => ("counter", true),
        MetricData::Sum(_) | MetricData::Gauge(_) => ("gauge", false),
        MetricData::Histogram(_) => ("histogram", false),
        // Not used by these services; skipped rather than misrendered.
        MetricData::ExponentialHistogram(_) => return,
    };
    let name = prometheus_name(metric.name(), metric.unit(), monotonic);
    if !metric.description().is_empty() {
        let help = metric
            .description()
            .replace('\\', "\\\\")
            .replace('\n', "\\n");
        let _ = writeln!(out, "# HELP {name} {help}");
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
    match data {
        MetricData::Sum(sum) => {
            for point in sum.data_points() {
                sample(out, &name, "", point.attributes(), None, point.value());
            }
        }
        MetricData::Gauge(gauge) => {
            for point in gauge.data_points() {
                sample(out, &name, "", point.attributes(), None, point.value());
            }
        }
        MetricData::Histogram(histogram) => {
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let mut bounds = point.bounds();
                for count in point.bucket_counts() {
                    cumulative += count;
                    let le = match bounds.next() {
                        Some(bound) => {
                            let mut s = String::new();
                            bound.write(&mut s);
                            s
                        }
                        None => "+Inf".to_owned(),
                    };
                    sample(
                        out,
                        &name,
                        "_bucket",
                        point.attributes(),
                        Some(&le),
                        cumulative,
                    );
                }
                sample(out, &name, "_sum", point.attributes(), None, point.sum());
                sample(
                    out,
                    &name,
                    "_count",
                    point.attributes(),
                    None,
                    point.count(),
                );
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn sample<'a, T: Sample>(
    out: &mut String,
    name: &str,
    suffix: &str,
    attributes: impl Iterator<Item = &'a KeyValue>,
    le: Option<&str>,
    value: T,
) {
    out.push_str(name);
    out.push_str(suffix);
    let mut first = true;
    let mut label = |out: &mut String, key: &str, value: &str| {
        out.push(if first { '{' } else { ',' });
        first = false;
        for c in key.chars() {
            out.push(if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            });
        }
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    };
    // Sorted, so a series always reads the same whatever order it was bound in.
    let mut attributes: Vec<&KeyValue> = attributes.collect();
    attributes.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
    for kv in attributes {
        match &kv.value {
            Value::String(s) => label(out, kv.key.as_str(), s.as_str()),
            other => label(out, kv.key.as_str(), &other.to_string()),
        }
    }
    if let Some(le) = le {
        label(out, "le", le);
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    value.write(out);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        assert_eq!(
            prometheus_name("agentmesh.worker.events.received", "{event}", true),
            "agentmesh_worker_events_received_total"
        );
        assert_eq!(
            prometheus_name("agentmesh.worker.evaluation.duration", "s", false),
            "agentmesh_worker_evaluation_duration_seconds"
        );
        assert_eq!(prometheus_name("9lives", "", false), "_9lives");
    }

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let metrics = Metrics::local("test");
        let counter = metrics
            .meter()
            .u64_counter("agentmesh.test.things")
            .with_description("Things \"seen\".")
            .with_unit("{thing}")
            .build();
        counter.add(2, &[KeyValue::new("kind", "a\"b")]);
        counter.add(1, &[KeyValue::new("kind", "c")]);
        let gauge = metrics.meter().u64_gauge("agentmesh.test.depth").build();
        gauge.record(7, &[]);
        let histogram = metrics
            .meter()
            .f64_histogram("agentmesh.test.duration")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        histogram.record(0.05, &[]);
        histogram.record(0.5, &[]);
        histogram.record(5.0, &[]);

        let text = metrics.prometheus_text();
        assert!(
            text.contains("# HELP agentmesh_test_things_total Things \"seen\".\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE agentmesh_test_things_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_things_total{kind=\"a\\\"b\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_things_total{kind=\"c\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE agentmesh_test_depth gauge\nagentmesh_test_depth 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE agentmesh_test_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_duration_seconds_bucket{le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_duration_seconds_bucket{le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_duration_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_duration_seconds_sum 5.55\n"),
            "{text}"
        );
        assert!(
            text.contains("agentmesh_test_duration_seconds_count 3\n"),
            "{text}"
        );
    }
}
