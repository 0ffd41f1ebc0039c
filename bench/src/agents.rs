//! Agent figures: how fast an SDK agent with a trivial handler drains a
//! backlog of deliveries, against a plain JetStream consumer on the same
//! subjects in the same run, and how long tool calls take while the serving
//! agent has a backlog queued. Prints figures; never fails on timing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agents_sdk::{Agent, Delivery, ToolCall, ToolSpec};
use async_nats::jetstream::{self, consumer, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use schemas::subjects;
use tokio_util::sync::CancellationToken;

/// Options of `mesh-bench agents`.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentsArgs {
    /// Deliveries in each backlog.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Bytes of data per delivery.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Handlers the agent runs at once in the drain (the SDK's default is 1).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Tool calls timed one at a time, then this many again 10 at once.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Milliseconds the busy agent's handler takes per delivery while the
    /// calls are timed (so its backlog stays queued throughout).
    #[arg(long, default_value_t = 1)]
    handler_ms: u64,
    /// The shipped policy directory (the tool calls go through the worker).
    #[arg(long, default_value = "policies")]
    policies: std::path::PathBuf,
}

/// Stores `n` handoffs from planner to coder straight into `MESH_DELIVER`,
/// as the worker would have routed them while the coder was away.
async fn backlog(js: &jetstream::Context, prefix: &str, n: u64, size: usize) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        if pending.len() >= 2048
            && let Some(ack) = pending.next().await
        {
            ack?;
        }
        let (headers, payload) = crate::sink::event(&format!("{prefix}-{i}"), size);
        let ack = js
            .send_publish(
                subjects::deliver("coder", "planner"),
                PublishMessage::build().headers(headers).payload(payload),
            )
            .await?;
        pending.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(())
}

/// Drains `n` messages with a plain durable on `mesh.deliver.coder.>`,
/// acknowledging each; returns messages/s.
async fn plain(js: &jetstream::Context, name: &str, n: u64) -> anyhow::Result<f64> {
    let stream = js.get_stream(schemas::subjects::STREAM_DELIVER).await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: subjects::deliveries_to("coder"),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .messages()
        .await?;
    let mut seen = 0;
    while seen < n {
        let Some(message) = messages.next().await else {
            anyhow::bail!("the plain consumer's stream ended after {seen}");
        };
        message
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        seen += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stream.delete_consumer(name).await?;
    Ok(rate)
}

/// Drains the coder's backlog of `n` with the SDK's `serve_with` and a
/// handler that does nothing; returns deliveries/s.
async fn sdk(url: &str, n: u64, concurrency: usize) -> anyhow::Result<f64> {
    // The backlog is stored unsigned, straight into MESH_DELIVER: this
    // measures draining (signing and verifying per event are measured in
    // git show b22b5ef:docs/benchmarks.md, "Signed decisions").
    let coder = Agent::builder("coder")
        .max_concurrent_deliveries(concurrency)
        .verify_deliveries(false)
        .connect(url)
        .await?;
    let handled = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let serving = tokio::spawn({
        let (coder, handled, stop) = (coder.clone(), handled.clone(), stop.clone());
        async move {
            coder
                .serve_with(stop.cancelled_owned(), move |_d: Delivery| {
                    handled.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<_, String>(()) }
                })
                .await
        }
    });
    while handled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Every acknowledgement reaches the broker before the next phase.
    while coder.pending().await?.deliveries_unacked > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    serving.await??;
    Ok(rate)
}

fn summary(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// `mesh-bench agents`.
pub(crate) async fn run(args: AgentsArgs) -> anyhow::Result<()> {
    let nats = testkit::NatsServer::start().await?;
    let url = nats.url();
    let js = jetstream::new(nats.connect().await?);
    broker_config::apply(&js, &broker_config::Options::default()).await?;

    // Draining: each phase stores a fresh backlog, which the plain consumer
    // and the agent (each its own durable, same subjects) both drain.
    for (phase, concurrency) in args.concurrency.iter().enumerate() {
        let started = Instant::now();
        backlog(&js, &format!("drain{phase}"), args.events, args.size).await?;
        println!(
            "backlog: {} deliveries of {} B stored in {:.1} s",
            args.events,
            args.size,
            started.elapsed().as_secs_f64()
        );
        // The plain durable reads the stream's first `events` messages; the
        // agent's durable resumes where its last phase ended, at this backlog.
        let raw = plain(&js, &format!("bench-plain-{phase}"), args.events).await?;
        let agent = sdk(&url, args.events, *concurrency).await?;
        println!(
            "drain {} deliveries: plain JetStream consumer {:.0}/s, SDK agent (serve_with, {} at once) {:.0}/s = {:.2}x",
            args.events,
            raw,
            concurrency,
            agent,
            agent / raw
        );
    }

    // Tool calls while the coder has a backlog: through the policy worker.
    let ready = tempfile::tempdir()?;
    let ready_file = ready.path().join("worker.ready");
    let config = policy_worker::Config {
        nats: broker_config::NatsArgs::url(url.clone()),
        policies: args.policies.clone(),
        watch_policies: false,
        ready_file: Some(ready_file.clone()),
        ..Default::default()
    };
    let worker_stop = CancellationToken::new();
    let worker = tokio::spawn(policy_worker::run(config, worker_stop.clone()));
    while !ready_file.exists() {
        if worker.is_finished() {
            anyhow::bail!("the policy worker stopped at start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backlog(&js, "busy", args.events, args.size).await?;
    // The backlog is unsigned (see `sdk`).
    let coder = Agent::builder("coder")
        .verify_deliveries(false)
        .tool(ToolSpec::new("code.search"), |call: ToolCall| async move {
            Ok(call.arguments().clone())
        })
        .connect(&url)
        .await?;
    let planner = Agent::connect("planner", &url).await?;
    let stop = CancellationToken::new();
    let handler_ms = args.handler_ms;
    let serving = tokio::spawn({
        let (coder, stop) = (coder.clone(), stop.clone());
        async move {
            coder
                .serve_with(stop.cancelled_owned(), move |_d: Delivery| async move {
                    tokio::time::sleep(Duration::from_millis(handler_ms)).await;
                    Ok::<_, String>(())
                })
                .await
        }
    });
    let before = coder.pending().await?;
    let call = |i: usize| {
        let wf = planner.workflow();
        async move {
            let started = Instant::now();
            wf.call_tool("code.search", serde_json::json!({"q": i}))
                .on("coder")
                .timeout(Duration::from_secs(10))
                .await
                .map(|_| started.elapsed())
        }
    };
    let mut sequential = Histogram::<u64>::new(3)?;
    for i in 0..args.calls {
        sequential.record(call(i).await?.as_micros() as u64)?;
    }
    let mut concurrent = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    let mut running = FuturesUnordered::new();
    let mut next = 0;
    while next < args.calls || !running.is_empty() {
        while running.len() < 10 && next < args.calls {
            running.push(call(next));
            next += 1;
        }
        if let Some(took) = running.next().await {
            concurrent.record(took?.as_micros() as u64)?;
        }
    }
    let per_second = args.calls as f64 / started.elapsed().as_secs_f64();
    let after = coder.pending().await?;
    let queued = |p: &agents_sdk::Pending| p.deliveries + p.deliveries_unacked as u64;
    println!(
        "tool calls while coder works through its backlog ({} ms per delivery; queued {} before, {} after):",
        handler_ms,
        queued(&before),
        queued(&after)
    );
    println!("  {} sequential: {}", args.calls, summary(&sequential));
    println!(
        "  {} at 10 concurrent: {}, {per_second:.0} calls/s",
        args.calls,
        summary(&concurrent)
    );
    stop.cancel();
    serving.await??;
    worker_stop.cancel();
    let _ = worker.await;
    Ok(())
}
