//! The instruments of each service, created once and bound to their
//! attributes at start, so recording on the per-event path is an atomic
//! update: no attribute lookup and no allocation.

use std::time::Duration;

use async_nats::jetstream::consumer::{Consumer, IntoConsumerConfig};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundGauge, BoundHistogram, Counter, Gauge};
use schemas::Decision;
use tokio_util::sync::CancellationToken;

use crate::Metrics;

/// Latency buckets (seconds) from 10 µs to 1 s: a Cedar decision takes tens
/// of microseconds, a slow one milliseconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Batch-size buckets (rows).
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0,
];

/// Signature-batch buckets (decisions signed together, up to the largest
/// `--sign-batch` that makes sense).
const SIGN_BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1_024.0];

/// What the policy worker published besides the receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Only the receipt (an allowed event without a target).
    ReceiptOnly,
    /// The receipt and the copy routed to the target.
    Delivery,
    /// The receipt and the dead-lettered copy.
    DeadLetter,
    /// Parked on `mesh.approval.request.<id>` for a human; its receipt and
    /// delivery follow the answer.
    Parked,
}

/// The policy worker's instruments.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    received: BoundCounter<u64>,
    allow: BoundCounter<u64>,
    deny: BoundCounter<u64>,
    invalid: BoundCounter<u64>,
    receipts: BoundCounter<u64>,
    deliveries: BoundCounter<u64>,
    dead: BoundCounter<u64>,
    parked: BoundCounter<u64>,
    publish_failures: BoundCounter<u64>,
    evaluation: BoundHistogram<f64>,
    sign_batch: BoundHistogram<u64>,
}

impl WorkerMetrics {
    /// Creates the instruments on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let meter = metrics.meter();
        let received = meter
            .u64_counter("agentmesh.worker.events.received")
            .with_description("Ingress events pulled from MESH_INGRESS (redeliveries included).")
            .with_unit("{event}")
            .build();
        let decisions = meter
            .u64_counter("agentmesh.worker.decisions")
            .with_description("Decisions made, by outcome.")
            .with_unit("{decision}")
            .build();
        let published = meter
            .u64_counter("agentmesh.worker.events.published")
            .with_description("Messages the worker published and JetStream stored, by kind (receipt, delivery, dead, parked).")
            .with_unit("{event}")
            .build();
        let failures = meter
            .u64_counter("agentmesh.worker.publish.failures")
            .with_description("Events whose publishes failed; each is redelivered.")
            .with_unit("{event}")
            .build();
        let evaluation = meter
            .f64_histogram("agentmesh.worker.evaluation.duration")
            .with_description(
                "Time from receiving an event to its decision (decode, validate, Cedar).",
            )
            .with_unit("s")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        let sign_batch = meter
            .u64_histogram("agentmesh.worker.sign.batch")
            .with_description(
                "Decisions covered by one signature: 1 signed alone, more a Merkle root signed once.",
            )
            .with_unit("{decision}")
            .with_boundaries(SIGN_BATCH_BUCKETS.to_vec())
            .build();
        let outcome = |d: &'static str| decisions.bind(&[KeyValue::new("decision", d)]);
        let kind = |k: &'static str| published.bind(&[KeyValue::new("kind", k)]);
        Self {
            received: received.bind(&[]),
            allow: outcome("allow"),
            deny: outcome("deny"),
            invalid: outcome("invalid"),
            receipts: kind("receipt"),
            deliveries: kind("delivery"),
            dead: kind("dead"),
            parked: kind("parked"),
            publish_failures: failures.bind(&[]),
            evaluation: evaluation.bind(&[]),
            sign_batch: sign_batch.bind(&[]),
        }
    }

    /// One event pulled.
    pub fn received(&self) {
        self.received.add(1);
    }

    /// One event decided, `evaluation` after it was received.
    pub fn decided(&self, decision: Decision, evaluation: Duration) {
        match decision {
            Decision::Allow => self.allow.add(1),
            Decision::Deny => self.deny.add(1),
            Decision::Invalid => self.invalid.add(1),
        }
        self.evaluation.record(evaluation.as_secs_f64());
    }

    /// One event's publishes stored.
    pub fn published(&self, what: Published) {
        match what {
            Published::ReceiptOnly => self.receipts.add(1),
            Published::Delivery => {
                self.receipts.add(1);
                self.deliveries.add(1);
            }
            Published::DeadLetter => {
                self.receipts.add(1);
                self.dead.add(1);
            }
            Published::Parked => self.parked.add(1),
        }
    }

    /// One event's publishes failed.
    pub fn publish_failed(&self) {
        self.publish_failures.add(1);
    }

    /// One signature made, over `decisions` decisions.
    pub fn signed(&self, decisions: usize) {
        self.sign_batch.record(decisions as u64);
    }
}

/// The audit sink's instruments; bind one [`TableMetrics`] per table.
#[derive(Debug, Clone)]
pub struct SinkMetrics {
    received: Counter<u64>,
    inserted: Counter<u64>,
    errors: Counter<u64>,
    quarantined: Counter<u64>,
    batch_rows: opentelemetry::metrics::Histogram<u64>,
    batches: Counter<u64>,
}

/// Why the audit sink ended a batch and started its insert: the `reason`
/// of `agentmesh.sink.batches`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchCut {
    /// It held `--batch-rows` rows.
    Rows,
    /// It held `--batch-bytes` bytes.
    Bytes,
    /// It was open for `--batch-period-ms`.
    Period,
    /// No message came for `--batch-idle-ms`.
    Idle,
    /// Something had to be in first: shutdown, a retry after a failed
    /// insert, or `--redacted-original drop` waiting for the worker.
    Forced,
}

impl BatchCut {
    const ALL: [BatchCut; 5] = [
        BatchCut::Rows,
        BatchCut::Bytes,
        BatchCut::Period,
        BatchCut::Idle,
        BatchCut::Forced,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchCut::Rows => "rows",
            BatchCut::Bytes => "bytes",
            BatchCut::Period => "period",
            BatchCut::Idle => "idle",
            BatchCut::Forced => "forced",
        }
    }
}

/// The audit sink's instruments bound to one table.
#[derive(Debug, Clone)]
pub struct TableMetrics {
    received: BoundCounter<u64>,
    inserted: BoundCounter<u64>,
    errors: BoundCounter<u64>,
    quarantined: BoundCounter<u64>,
    batch_rows: BoundHistogram<u64>,
    /// One per [`BatchCut`], in [`BatchCut::ALL`]'s order.
    batches: [BoundCounter<u64>; 5],
}

impl SinkMetrics {
    /// Creates the instruments on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let meter = metrics.meter();
        Self {
            received: meter
                .u64_counter("agentmesh.sink.messages.received")
                .with_description("Messages pulled for a table (redeliveries included).")
                .with_unit("{message}")
                .build(),
            inserted: meter
                .u64_counter("agentmesh.sink.rows.inserted")
                .with_description("Rows inserted into ClickHouse and acked.")
                .with_unit("{row}")
                .build(),
            errors: meter
                .u64_counter("agentmesh.sink.insert.errors")
                .with_description("Failed insert attempts (each is retried).")
                .with_unit("{error}")
                .build(),
            quarantined: meter
                .u64_counter("agentmesh.sink.rows.quarantined")
                .with_description(
                    "Rows ClickHouse refused, written to the `rejected` table with its error and acked.",
                )
                .with_unit("{row}")
                .build(),
            batch_rows: meter
                .u64_histogram("agentmesh.sink.batch.rows")
                .with_description("Rows per inserted batch.")
                .with_unit("{row}")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            batches: meter
                .u64_counter("agentmesh.sink.batches")
                .with_description(
                    "Batches ended and sent to ClickHouse, by why: rows, bytes, period, idle or forced.",
                )
                .with_unit("{batch}")
                .build(),
        }
    }

    /// The instruments for `table`.
    pub fn table(&self, table: &'static str) -> TableMetrics {
        let attrs = [KeyValue::new("table", table)];
        TableMetrics {
            received: self.received.bind(&attrs),
            inserted: self.inserted.bind(&attrs),
            errors: self.errors.bind(&attrs),
            quarantined: self.quarantined.bind(&attrs),
            batch_rows: self.batch_rows.bind(&attrs),
            batches: BatchCut::ALL.map(|cut| {
                self.batches.bind(&[
                    KeyValue::new("table", table),
                    KeyValue::new("reason", cut.as_str()),
                ])
            }),
        }
    }
}

impl TableMetrics {
    /// One message pulled.
    pub fn received(&self) {
        self.received.add(1);
    }

    /// One batch of `rows` inserted.
    pub fn inserted(&self, rows: u64) {
        self.inserted.add(rows);
        self.batch_rows.record(rows);
    }

    /// One batch ended, for `why`.
    pub fn batch_cut(&self, why: BatchCut) {
        self.batches[why as usize].add(1);
    }

    /// One insert attempt failed.
    pub fn insert_failed(&self) {
        self.errors.add(1);
    }

    /// `rows` refused by ClickHouse and quarantined.
    pub fn quarantined(&self, rows: u64) {
        self.quarantined.add(rows);
    }
}

/// The GPU scaler's instruments.
#[derive(Debug, Clone)]
pub struct ScalerMetrics {
    leases: Gauge<u64>,
    decisions: Counter<u64>,
    rounds: BoundCounter<u64>,
}

impl ScalerMetrics {
    /// Creates the instruments on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let meter = metrics.meter();
        Self {
            leases: meter
                .u64_gauge("agentmesh.gpu.leases")
                .with_description("GPUs leased to each pool after the last round.")
                .with_unit("{gpu}")
                .build(),
            decisions: meter
                .u64_counter("agentmesh.gpu.scaling.decisions")
                .with_description("Lease decisions, by pool and action (granted, released).")
                .with_unit("{decision}")
                .build(),
            rounds: meter
                .u64_counter("agentmesh.gpu.scaling.rounds")
                .with_description("Scaling rounds run.")
                .with_unit("{round}")
                .build()
                .bind(&[]),
        }
    }

    /// One scaling round ran.
    pub fn round(&self) {
        self.rounds.add(1);
    }

    /// `pool` holds `gpus` leases now.
    pub fn leases(&self, pool: &str, gpus: u64) {
        self.leases
            .record(gpus, &[KeyValue::new("pool", pool.to_owned())]);
    }

    /// A lease of `pool` was granted or released (`action`).
    pub fn decision(&self, pool: &str, action: &'static str) {
        self.decisions.add(
            1,
            &[
                KeyValue::new("pool", pool.to_owned()),
                KeyValue::new("action", action),
            ],
        );
    }
}

/// The MCP gateway's instruments (`docs/mcp.md`).
#[derive(Debug, Clone)]
pub struct McpMetrics {
    refused: Counter<u64>,
    calls: Counter<u64>,
    duration: opentelemetry::metrics::Histogram<f64>,
}

impl McpMetrics {
    /// Creates the instruments on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let meter = metrics.meter();
        Self {
            refused: meter
                .u64_counter("agentmesh.mcp.requests.refused")
                .with_description("HTTP requests refused before MCP, by reason (unauthorized, too_large, malformed, not_found).")
                .with_unit("{request}")
                .build(),
            calls: meter
                .u64_counter("agentmesh.mcp.tool.calls")
                .with_description("MCP tools/call answered, by result (ok, denied, timed_out, error).")
                .with_unit("{call}")
                .build(),
            duration: meter
                .f64_histogram("agentmesh.mcp.tool.call.duration")
                .with_description("A tools/call from its arrival to its answer: publish, decision, the tool, the result.")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
        }
    }

    /// A request was refused before MCP saw it.
    pub fn refused(&self, reason: &'static str) {
        self.refused.add(1, &[KeyValue::new("reason", reason)]);
    }

    /// A `tools/call` was answered with `result` after `took`.
    pub fn call(&self, result: &'static str, took: Duration) {
        let attrs = [KeyValue::new("result", result)];
        self.calls.add(1, &attrs);
        self.duration.record(took.as_secs_f64(), &attrs);
    }
}

/// The policy worker's tool-result cache (`docs/cache.md`).
#[derive(Debug, Clone)]
pub struct CacheMetrics {
    hits: BoundCounter<u64>,
    misses: BoundCounter<u64>,
    bypasses: BoundCounter<u64>,
    stored: BoundCounter<u64>,
    entries: BoundGauge<u64>,
    bytes: BoundGauge<u64>,
}

impl CacheMetrics {
    /// Creates the instruments on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let meter = metrics.meter();
        let lookups = meter
            .u64_counter("agentmesh.worker.cache.lookups")
            .with_description("Allowed calls of cacheable tools, by result (hit, miss, bypass).")
            .with_unit("{call}")
            .build();
        let outcome = |r: &'static str| lookups.bind(&[KeyValue::new("result", r)]);
        Self {
            hits: outcome("hit"),
            misses: outcome("miss"),
            bypasses: outcome("bypass"),
            stored: meter
                .u64_counter("agentmesh.worker.cache.stored")
                .with_description("Tool results stored in the cache.")
                .with_unit("{result}")
                .build()
                .bind(&[]),
            entries: meter
                .u64_gauge("agentmesh.worker.cache.entries")
                .with_description(
                    "Tool results stored in the `mesh-tool-cache` bucket.",
                )
                .with_unit("{entry}")
                .build()
                .bind(&[]),
            bytes: meter
                .u64_gauge("agentmesh.worker.cache.bytes")
                .with_description("Bytes stored in the `mesh-tool-cache` bucket (results and the records of calls in flight).")
                .with_unit("By")
                .build()
                .bind(&[]),
        }
    }

    /// One call answered from the cache.
    pub fn hit(&self) {
        self.hits.add(1);
    }

    /// One call delivered to the tool, its result to fill the cache.
    pub fn miss(&self) {
        self.misses.add(1);
    }

    /// One call of a cacheable tool delivered without the cache.
    pub fn bypass(&self) {
        self.bypasses.add(1);
    }

    /// One result stored.
    pub fn stored(&self) {
        self.stored.add(1);
    }

    /// The bucket's size, as last read.
    pub fn size(&self, entries: u64, bytes: u64) {
        self.entries.record(entries);
        self.bytes.record(bytes);
    }
}

/// Whether each NATS node fsyncs every write before acknowledging it, as
/// the service read it from the node's `/varz` at start.
#[derive(Debug, Clone)]
pub struct NatsDurability {
    sync_always: Gauge<u64>,
}

impl NatsDurability {
    /// Creates the instrument on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            sync_always: metrics
                .meter()
                .u64_gauge("agentmesh.nats.sync_always")
                .with_description("1 when the NATS node fsyncs every write before acknowledging it (`sync_interval: always`), 0 when it flushes on an interval (an OS crash or power cut loses what it acknowledged since).")
                .build(),
        }
    }

    /// Node `server` runs with (`true`) or without per-write fsync.
    pub fn record(&self, server: &str, sync_always: bool) {
        self.sync_always.record(
            u64::from(sync_always),
            &[KeyValue::new("server", server.to_owned())],
        );
    }
}

/// Messages a stream lost after acknowledging them, as the policy worker
/// found them (its `watermarks` check).
#[derive(Debug, Clone)]
pub struct StreamLosses {
    losses: Counter<u64>,
}

impl StreamLosses {
    /// Creates the instrument on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            losses: metrics
                .meter()
                .u64_counter("agentmesh.worker.stream_losses")
                .with_description("Times a stream no longer held a message the worker had stored there (a NATS node back with a truncated or damaged store): the events of the lost messages were acknowledged.")
                .build(),
        }
    }

    /// `stream` lost messages.
    pub fn add(&self, stream: &str) {
        self.losses
            .add(1, &[KeyValue::new("stream", stream.to_owned())]);
    }
}

/// Consumer lag: what a durable consumer has not yet been handed
/// (`num_pending`) and what it holds unacked (`num_ack_pending`), polled
/// from the consumer's info.
#[derive(Debug, Clone)]
pub struct ConsumerLag {
    pending: Gauge<u64>,
    ack_pending: Gauge<u64>,
}

impl ConsumerLag {
    /// Creates the instruments on `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let meter = metrics.meter();
        Self {
            pending: meter
                .u64_gauge("agentmesh.consumer.pending")
                .with_description(
                    "Messages in the stream not yet delivered to the durable consumer (its lag).",
                )
                .with_unit("{message}")
                .build(),
            ack_pending: meter
                .u64_gauge("agentmesh.consumer.ack_pending")
                .with_description("Messages delivered to the durable consumer and not yet acked.")
                .with_unit("{message}")
                .build(),
        }
    }

    /// Polls `consumer` every `interval` until `shutdown`; a failed poll is
    /// skipped (the gauges keep their last value).
    pub fn watch<C>(
        &self,
        consumer: Consumer<C>,
        stream: &'static str,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()>
    where
        C: IntoConsumerConfig + Send + Sync + 'static,
        Consumer<C>: Send + Sync,
    {
        let name = consumer
            .cached_info()
            .config
            .durable_name
            .clone()
            .unwrap_or_else(|| consumer.cached_info().name.clone());
        let attrs = [
            KeyValue::new("stream", stream),
            KeyValue::new("consumer", name),
        ];
        let pending: BoundGauge<u64> = self.pending.bind(&attrs);
        let ack_pending: BoundGauge<u64> = self.ack_pending.bind(&attrs);
        tokio::spawn(async move {
            loop {
                if let Ok(info) = consumer.get_info().await {
                    pending.record(info.num_pending);
                    ack_pending.record(info.num_ack_pending as u64);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_metrics_render_by_outcome_and_kind() {
        let metrics = Metrics::local("test");
        let worker = WorkerMetrics::new(&metrics);
        worker.received();
        worker.received();
        worker.decided(Decision::Allow, Duration::from_micros(30));
        worker.decided(Decision::Deny, Duration::from_millis(2));
        worker.published(Published::Delivery);
        worker.published(Published::DeadLetter);
        worker.published(Published::Parked);
        let text = metrics.prometheus_text();
        for line in [
            "agentmesh_worker_events_received_total 2\n",
            "agentmesh_worker_decisions_total{decision=\"allow\"} 1\n",
            "agentmesh_worker_decisions_total{decision=\"deny\"} 1\n",
            "agentmesh_worker_events_published_total{kind=\"receipt\"} 2\n",
            "agentmesh_worker_events_published_total{kind=\"delivery\"} 1\n",
            "agentmesh_worker_events_published_total{kind=\"dead\"} 1\n",
            "agentmesh_worker_events_published_total{kind=\"parked\"} 1\n",
            "agentmesh_worker_evaluation_duration_seconds_bucket{le=\"0.00005\"} 1\n",
            "agentmesh_worker_evaluation_duration_seconds_count 2\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn sink_batches_render_by_table_and_reason() {
        let metrics = Metrics::local("test");
        let sink = SinkMetrics::new(&metrics);
        let events = sink.table("events");
        for (i, cut) in BatchCut::ALL.into_iter().enumerate() {
            // `batch_cut` indexes its counters by the variant.
            assert_eq!(cut as usize, i);
            for _ in 0..=i {
                events.batch_cut(cut);
            }
        }
        sink.table("decisions").batch_cut(BatchCut::Idle);
        let text = metrics.prometheus_text();
        for line in [
            "agentmesh_sink_batches_total{reason=\"rows\",table=\"events\"} 1\n",
            "agentmesh_sink_batches_total{reason=\"bytes\",table=\"events\"} 2\n",
            "agentmesh_sink_batches_total{reason=\"period\",table=\"events\"} 3\n",
            "agentmesh_sink_batches_total{reason=\"idle\",table=\"events\"} 4\n",
            "agentmesh_sink_batches_total{reason=\"forced\",table=\"events\"} 5\n",
            "agentmesh_sink_batches_total{reason=\"idle\",table=\"decisions\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn cache_metrics_render() {
        let metrics = Metrics::local("test");
        let cache = CacheMetrics::new(&metrics);
        cache.hit();
        cache.hit();
        cache.miss();
        cache.bypass();
        cache.stored();
        cache.size(3, 4096);
        let text = metrics.prometheus_text();
        for line in [
            "agentmesh_worker_cache_lookups_total{result=\"hit\"} 2\n",
            "agentmesh_worker_cache_lookups_total{result=\"miss\"} 1\n",
            "agentmesh_worker_cache_lookups_total{result=\"bypass\"} 1\n",
            "agentmesh_worker_cache_stored_total 1\n",
            "agentmesh_worker_cache_entries 3\n",
            "agentmesh_worker_cache_bytes 4096\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn sink_and_scaler_metrics_render() {
        let metrics = Metrics::local("test");
        let events = SinkMetrics::new(&metrics).table("events");
        events.received();
        events.inserted(7);
        events.insert_failed();
        events.quarantined(2);
        let scaler = ScalerMetrics::new(&metrics);
        scaler.round();
        scaler.leases("coder", 2);
        scaler.decision("coder", "granted");
        let text = metrics.prometheus_text();
        for line in [
            "agentmesh_sink_messages_received_total{table=\"events\"} 1\n",
            "agentmesh_sink_rows_inserted_total{table=\"events\"} 7\n",
            "agentmesh_sink_insert_errors_total{table=\"events\"} 1\n",
            "agentmesh_sink_rows_quarantined_total{table=\"events\"} 2\n",
            "agentmesh_sink_batch_rows_bucket{table=\"events\",le=\"10\"} 1\n",
            "agentmesh_gpu_leases{pool=\"coder\"} 2\n",
            "agentmesh_gpu_scaling_rounds_total 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            text.contains(
                "agentmesh_gpu_scaling_decisions_total{action=\"granted\",pool=\"coder\"} 1\n"
            ),
            "{text}"
        );
    }
}
