//! Operating the audit sink, against real NATS and ClickHouse servers and
//! the real binary: two replicas sharing the durable consumers, `/readyz`
//! following ClickHouse, batch and error metrics on `/metrics`, and
//! `audit.batch` spans exported over OTLP with a link to every event's trace.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::{Harness, WAIT, chain};
use schemas::TraceParent;
use telemetry::testing::{OtlpReceiver, http_get};
use testkit::{Service, eventually, free_port, sample_value};

/// The `audit-sink` binary with its health server on a port of its own.
struct SinkProcess {
    service: Service,
    addr: SocketAddr,
}

impl SinkProcess {
    async fn start(harness: &Harness, otlp: &str) -> Self {
        let config = harness.config();
        let port = free_port().unwrap();
        let mut service = Service::spawn(
            Command::new(env!("CARGO_BIN_EXE_audit-sink"))
                .args(["--nats-url", &config.nats.url])
                .args(["--clickhouse-url", &config.clickhouse_url])
                .args(["--database", &config.database])
                .args(["--batch-rows", "20", "--batch-period-ms", "100"])
                .args(["--retry-max-ms", "300", "--ack-wait-ms", "5000"])
                .args(["--http-port", &port.to_string(), "--http-host", "127.0.0.1"])
                .args(["--otlp-endpoint", otlp, "--otlp-metrics-interval-ms", "200"])
                .args(["--log-format", "json"])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null()),
        )
        .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let body = service
            .wait_until(WAIT, "the sink's /readyz to answer 200", || async move {
                match http_get(addr, "/readyz").await {
                    Ok((200, body)) => Some(body),
                    _ => None,
                }
            })
            .await
            .unwrap_or_else(|e| panic!("audit-sink exited: {e}"));
        assert_eq!(body, "consumers: ok\nclickhouse: ok\nnats: ok\n");
        Self { service, addr }
    }

    /// The value of one sample on `/metrics`, 0 when absent.
    async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = http_get(self.addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        sample_value(&body, sample)
    }
}

#[tokio::test]
async fn two_replicas_share_the_tables_link_batches_to_traces_and_report_clickhouse() {
    let mut harness = Harness::start().await.unwrap();
    let receiver = OtlpReceiver::start().await.unwrap();
    let a = SinkProcess::start(&harness, &receiver.endpoint()).await;
    let b = SinkProcess::start(&harness, &receiver.endpoint()).await;

    const N: usize = 300;
    let trace = TraceParent::mint();
    let mut published = BTreeSet::new();
    for step in chain("ops", N) {
        let message = step.message(&trace);
        let tp = message
            .headers
            .as_ref()
            .and_then(|h| h.get("ce-traceparent"))
            .unwrap()
            .as_str()
            .parse::<TraceParent>()
            .unwrap();
        published.insert((tp.trace_id_hex(), tp.parent_id_hex()));
        harness.publish(&message).await.unwrap();
    }
    harness.wait_rows("events", N as u64).await.unwrap();

    // Every row inserted by exactly one replica, and both did work.
    let inserted = "agentmesh_sink_rows_inserted_total{table=\"events\"}";
    let (rows_a, rows_b) = eventually(WAIT, "both replicas' rows to add up to N", || async {
        let (x, y) = (a.metric(inserted).await, b.metric(inserted).await);
        (x + y == N as f64).then_some((x, y))
    })
    .await
    .unwrap();
    assert!(
        rows_a > 0.0 && rows_b > 0.0,
        "one replica did all the work: {rows_a} + {rows_b}"
    );
    let batches = "agentmesh_sink_batch_rows_count{table=\"events\"}";
    assert!(a.metric(batches).await + b.metric(batches).await >= (N / 20) as f64);

    // Each event's trace is linked from the batch that wrote it.
    let linked = eventually(WAIT, "audit.batch spans linking every event", || async {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| {
                s.name == "audit.batch"
                    && s.attributes.get("db.collection.name").map(String::as_str) == Some("events")
            })
            .collect();
        let linked: BTreeSet<(String, String)> =
            spans.iter().flat_map(|s| s.links.iter().cloned()).collect();
        published.is_subset(&linked).then_some(spans)
    })
    .await
    .unwrap();
    assert!(
        linked
            .iter()
            .all(|s| s.service == "audit-sink" && s.parent_span_id.is_empty())
    );
    let rows: u64 = linked
        .iter()
        .map(|s| s.attributes["rows"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(rows, N as u64, "rows recorded on the batch spans");
    // The instruments reach the collector over OTLP too.
    eventually(WAIT, "sink metrics over OTLP", || async {
        receiver
            .points()
            .into_iter()
            .find(|p| p.metric == "agentmesh.sink.rows.inserted" && p.service == "audit-sink")
    })
    .await
    .unwrap();

    // ClickHouse down: not ready, inserts fail and are counted; back: ready, row in.
    harness.ch_mut().stop().unwrap();
    for sink in [&a, &b] {
        let body = eventually(WAIT, "/readyz to fail without ClickHouse", || async {
            match http_get(sink.addr, "/readyz").await {
                Ok((503, body)) => Some(body),
                _ => None,
            }
        })
        .await
        .unwrap();
        assert!(body.contains("clickhouse: failing"), "{body}");
        assert_eq!(http_get(sink.addr, "/healthz").await.unwrap().0, 200);
    }
    let late = chain("late", 1).remove(0);
    harness.publish(&late.message(&trace)).await.unwrap();
    let errors = "agentmesh_sink_insert_errors_total{table=\"events\"}";
    eventually(WAIT, "a failed insert to be counted", || async {
        (a.metric(errors).await + b.metric(errors).await > 0.0).then_some(())
    })
    .await
    .unwrap();
    harness.ch_mut().start_again().await.unwrap();
    for sink in [&a, &b] {
        eventually(WAIT, "/readyz to pass once ClickHouse is back", || async {
            matches!(http_get(sink.addr, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await
        .unwrap();
    }
    harness.wait_rows("events", N as u64 + 1).await.unwrap();
    for line in a
        .service
        .log_text()
        .lines()
        .chain(b.service.log_text().lines())
    {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
}
