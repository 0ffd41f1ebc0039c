//! Nothing is lost when ClickHouse goes away mid-stream or the sink is
//! killed, and nothing shows up twice through the shipped queries.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::jetstream;
use audit_sink::queries;
use common::{Harness, Message, Step, WAIT, chain};
use schemas::{Decision, TraceParent};
use testkit::eventually;
use tokio::sync::Notify;

/// The receipt each chain step gets: every tenth tool call is denied.
fn receipt(step: &Step, index: usize, trace: &TraceParent) -> Message {
    if step.tool.is_some() && index % 30 == 1 {
        step.receipt(trace, Decision::Deny, &["forbid-shell-exec"], 7)
    } else {
        step.receipt(trace, Decision::Allow, &["members-record-steps"], 3)
    }
}

/// Publishes `steps` (event, then receipt) with JetStream acks, counting
/// progress; after `pause_after` steps it waits for `resume`.
async fn publish(
    js: jetstream::Context,
    steps: Vec<(Step, usize, TraceParent)>,
    progress: Arc<AtomicUsize>,
    pause_after: usize,
    resume: Arc<Notify>,
) -> anyhow::Result<()> {
    for (n, (step, index, trace)) in steps.iter().enumerate() {
        if n == pause_after {
            resume.notified().await;
        }
        for message in [step.message(trace), receipt(step, *index, trace)] {
            let ack = match message.headers {
                Some(h) => {
                    js.publish_with_headers(message.subject, h, message.payload)
                        .await?
                }
                None => js.publish(message.subject, message.payload).await?,
            };
            ack.await?;
        }
        progress.store(n + 1, Ordering::SeqCst);
        // Spread the stream over time so inserts happen all along.
        if n % 20 == 0 {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

fn workload(
    traces: usize,
    per_trace: usize,
) -> (Vec<(Step, usize, TraceParent)>, Vec<TraceParent>) {
    let mut steps = Vec::new();
    let mut ids = Vec::new();
    for t in 0..traces {
        let trace = TraceParent::mint();
        for (i, step) in chain(&format!("t{t}"), per_trace).into_iter().enumerate() {
            steps.push((step, i, trace));
        }
        ids.push(trace);
    }
    (steps, ids)
}

/// Checks that every published row is there exactly once, as the tables and
/// the shipped queries show them.
async fn assert_complete(
    h: &Harness,
    traces: &[TraceParent],
    per_trace: usize,
) -> anyhow::Result<()> {
    let total = (traces.len() * per_trace) as u64;
    h.wait_rows("events", total).await?;
    h.wait_rows("decisions", total).await?;
    assert_eq!(h.count_final("events").await?, total);
    assert_eq!(h.count_final("decisions").await?, total);
    let raw = h.query("SELECT count() FROM events").await?;
    eprintln!(
        "events: {total} published, {} rows before merging",
        raw.trim()
    );
    let distinct = h.query("SELECT uniqExact(event_id) FROM events").await?;
    assert_eq!(distinct.trim(), total.to_string());

    for trace in traces {
        let tree = h
            .shipped(
                queries::DECISION_TREE,
                &[("trace_id", &trace.trace_id_hex())],
            )
            .await?;
        assert_eq!(tree.len(), per_trace, "one line per step");
        let undecided = tree
            .iter()
            .filter(|l| l.split('\t').nth(8) == Some(""))
            .count();
        assert_eq!(undecided, 0, "every step has its decision");
    }
    let calls = (0..per_trace).filter(|i| i % 3 == 1).count() * traces.len();
    let denied = (0..per_trace).filter(|i| i % 30 == 1).count() * traces.len();
    let range = [
        ("from", "2026-03-01 10:00:00"),
        ("to", "2026-03-01 11:00:00"),
    ];
    let tools = h.shipped(queries::TOOLS_BY_AGENT, &range).await?;
    let tools: Vec<String> = tools
        .iter()
        .map(|l| l.split('\t').take(7).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        tools,
        vec![format!(
            "coder fs.read {calls} {} {denied} 0 0",
            calls - denied
        )]
    );
    let denials = h.shipped(queries::DENIALS, &range).await?;
    assert_eq!(denials.len(), denied);
    Ok(())
}

#[tokio::test]
async fn clickhouse_stopped_mid_stream_and_restarted_loses_nothing() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    if h.ch().is_external() {
        eprintln!("skipped: cannot stop the external ClickHouse at CLICKHOUSE_URL");
        return Ok(());
    }
    let sink = h.spawn_sink(h.config()).await?;
    let (steps, traces) = workload(3, 400);
    let progress = Arc::new(AtomicUsize::new(0));
    let resume = Arc::new(Notify::new());
    let publisher = tokio::spawn(publish(
        h.js.clone(),
        steps,
        progress.clone(),
        400,
        resume.clone(),
    ));

    // Some rows are in, then ClickHouse goes away.
    h.wait_raw_rows("events", 100).await?;
    h.ch_mut().stop()?;
    resume.notify_one();

    // The stream goes on while ClickHouse is down: the sink holds its batch
    // and acks nothing beyond what was inserted.
    eventually(WAIT, "800 steps published during the outage", || async {
        (progress.load(Ordering::SeqCst) >= 800).then_some(())
    })
    .await?;
    let stream = h.js.get_stream(schemas::subjects::STREAM_INGRESS).await?;
    let held = eventually(WAIT, "the sink holding unacked events", || async {
        let mut consumer = stream
            .get_consumer::<jetstream::consumer::pull::Config>("audit-sink-events")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_ack_pending > 0).then_some(info.clone())
    })
    .await?;
    // At most the first 400 events (stream sequences 1 to 400) were published
    // before ClickHouse stopped; an ack above them came during the outage.
    assert!(
        held.ack_floor.stream_sequence <= 400,
        "acked up to {} while ClickHouse was down",
        held.ack_floor.stream_sequence
    );

    // Back, with the publisher still going.
    h.ch_mut().start_again().await?;
    publisher.await??;
    assert_complete(&h, &traces, 400).await?;

    // Everything is acked once it is in.
    events_fully_acked(&stream).await?;
    sink.stop().await
}

#[tokio::test]
async fn sink_killed_and_restarted_loses_nothing_and_shows_no_duplicate() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let mut config = h.config();
    config.ack_wait_ms = 2_000;
    let mut sink = h.spawn_binary(&config).await?;
    let (steps, traces) = workload(4, 300);
    let progress = Arc::new(AtomicUsize::new(0));
    let resume = Arc::new(Notify::new());
    let publisher = tokio::spawn(publish(
        h.js.clone(),
        steps,
        progress.clone(),
        300,
        resume.clone(),
    ));

    // Kill -9 while it is busy: some rows in, batches open, acks pending.
    h.wait_raw_rows("events", 150).await?;
    sink.kill()?;
    sink.wait()?;
    resume.notify_one();
    eventually(
        WAIT,
        "600 steps published while the sink is dead",
        || async { (progress.load(Ordering::SeqCst) >= 600).then_some(()) },
    )
    .await?;

    let mut sink = h.spawn_binary(&config).await?;
    publisher.await??;
    let result = assert_complete(&h, &traces, 300).await;
    sink.kill()?;
    sink.wait()?;
    result
}

#[tokio::test]
async fn shutdown_during_an_outage_inserts_the_held_batch_within_the_grace_period()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    if h.ch().is_external() {
        eprintln!("skipped: cannot stop the external ClickHouse at CLICKHOUSE_URL");
        return Ok(());
    }
    let port = testkit::free_port()?;
    let mut config = h.config();
    config.shutdown_grace_ms = 45_000;
    config.ops.http_port = Some(port);
    config.ops.http_host = [127, 0, 0, 1].into();
    let sink = h.spawn_sink(config).await?;
    let trace = TraceParent::mint();
    let steps = chain("grace", 3);
    for step in &steps[..2] {
        h.publish(&step.message(&trace)).await?;
    }
    h.wait_rows("events", 2).await?;

    // One event while ClickHouse is down: once an insert has failed, the
    // sink holds it in its batch.
    h.ch_mut().stop()?;
    h.publish(&steps[2].message(&trace)).await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let errors = "agentmesh_sink_insert_errors_total{table=\"events\"} ";
    eventually(
        WAIT,
        "an insert failing while ClickHouse is down",
        || async {
            let (_, body) = telemetry::testing::http_get(addr, "/metrics").await.ok()?;
            body.lines()
                .find_map(|l| l.strip_prefix(errors)?.parse::<f64>().ok())
                .filter(|n| *n > 0.0)
        },
    )
    .await?;

    // Shut down first, then bring ClickHouse back within the grace period:
    // the sink returns only once the held event is in.
    sink.shutdown.cancel();
    let stopping = tokio::spawn(sink.stop());
    h.ch_mut().start_again().await?;
    stopping.await??;
    assert_eq!(h.count_final("events").await?, 3);
    let stream = h.js.get_stream(schemas::subjects::STREAM_INGRESS).await?;
    events_fully_acked(&stream).await?;
    Ok(())
}

#[tokio::test]
async fn a_dropped_table_is_created_again_and_the_held_batch_inserted() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let trace = TraceParent::mint();
    let steps = chain("dropped", 2);
    h.publish(&steps[0].message(&trace)).await?;
    h.wait_rows("events", 1).await?;

    h.query("DROP TABLE events").await?;
    h.publish(&steps[1].message(&trace)).await?;
    h.wait_rows("events", 1).await?;
    let ids = h.query("SELECT event_id FROM events FINAL").await?;
    assert_eq!(ids.trim(), "dropped-00001");
    sink.stop().await
}

/// With `--clickhouse-wait-secs`, a sink whose ClickHouse never answers
/// stops after that long with an error that names the URL and the setting
/// (compose.yaml's sink exits instead of waiting half-configured).
#[tokio::test]
async fn a_sink_whose_clickhouse_never_answers_gives_up_after_the_wait() -> anyhow::Result<()> {
    let nats = testkit::NatsServer::start().await?;
    // Nothing listens on port 1.
    let mut config = audit_sink::Config::new(nats.url(), "http://127.0.0.1:1");
    config.clickhouse_wait_secs = 1;
    config.retry_max_ms = 200;
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        WAIT,
        audit_sink::run(config, tokio_util::sync::CancellationToken::new()),
    )
    .await?;
    let error = result
        .expect_err("the sink ran without ClickHouse")
        .to_string();
    assert!(
        error.contains("no ClickHouse at http://127.0.0.1:1 answered within 1 s")
            && error.contains("AGENTMESH_AUDIT_CLICKHOUSE_WAIT_SECS"),
        "{error}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(700),
        "{error}"
    );
    Ok(())
}

/// Waits until the sink's `events` consumer has nothing pending or unacked.
async fn events_fully_acked(stream: &jetstream::stream::Stream) -> anyhow::Result<()> {
    eventually(WAIT, "the sink's consumer fully acked", || async {
        let mut consumer = stream
            .get_consumer::<jetstream::consumer::pull::Config>("audit-sink-events")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await?;
    Ok(())
}
