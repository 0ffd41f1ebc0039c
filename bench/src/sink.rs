//! Audit sink figures: rows/s from a backlog in `MESH_INGRESS` into
//! ClickHouse, and the delay from publish until a row is queryable.

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use schemas::subjects;

use crate::{Service, sibling};

/// Options of `mesh-bench sink`.
#[derive(Debug, clap::Args)]
pub(crate) struct SinkArgs {
    /// Events in the backlog the sink drains.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Single events timed from publish until queryable.
    #[arg(long, default_value_t = 20)]
    probes: usize,
}

/// A binary-mode event for the backlog.
pub(crate) fn event(id: &str, size: usize) -> (HeaderMap, bytes::Bytes) {
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.task.handoff"),
        ("ce-target", "coder"),
        ("ce-datacontenttype", "application/json"),
    ] {
        headers.insert(k, v);
    }
    headers.insert("ce-id", id);
    headers.insert("Nats-Msg-Id", id);
    let pad = "x".repeat(size.saturating_sub(12));
    (headers, format!("{{\"pad\":\"{pad}\"}}").into())
}

/// Publishes `n` events with ids `<prefix>-<i>`, 2048 unacknowledged at most.
pub(crate) async fn publish_backlog(
    js: &jetstream::Context,
    prefix: &str,
    n: u64,
    size: usize,
) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        if pending.len() >= 2048
            && let Some(ack) = pending.next().await
        {
            ack?;
        }
        let (headers, payload) = event(&format!("{prefix}-{i}"), size);
        let ack = js
            .send_publish(
                subjects::ingress("planner", "handoff"),
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

async fn count(ch: &testkit::ClickHouseServer, sql: &str) -> u64 {
    ch.query_text(sql)
        .await
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) async fn run(args: SinkArgs) -> anyhow::Result<()> {
    let nats = testkit::NatsServer::start().await?;
    let ch = testkit::ClickHouseServer::start().await?;
    let mut js = jetstream::new(nats.connect().await?);
    // With every write fsynced on a busy disk, the backlog's 2,048 open
    // publishes wait longer than the client's default 5 s for their acks.
    js.set_timeout(crate::ACK_TIMEOUT);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let me = std::env::current_exe()?;
    let sink_cmd = || -> anyhow::Result<Command> {
        let mut c = Command::new(sibling(&me, "audit-sink")?);
        c.args([
            "--nats-url",
            &nats.url(),
            "--clickhouse-url",
            &ch.url(),
            "--database",
            "agentmesh",
        ]);
        Ok(c)
    };
    println!(
        "mesh-bench sink: ClickHouse {} at {}",
        ch.version().await.unwrap_or_default().trim(),
        ch.url()
    );

    // Rows/s: a backlog first, then the sink drains it.
    let started = Instant::now();
    publish_backlog(&js, "backlog", args.events, args.size).await?;
    println!(
        "published {} events of {} B into MESH_INGRESS in {:.1} s",
        args.events,
        args.size,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let cpu_before = (crate::drain::cpu(nats.pid()), crate::drain::cpu(ch.pid()));
    let sink = Service::spawn("audit-sink", sink_cmd()?).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let rows = count(&ch, "SELECT count() FROM agentmesh.events").await;
        if rows >= args.events {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "sink stalled at {rows} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    // CPU per row of each process while the backlog drained (ClickHouse's
    // background merges included as far as they ran meanwhile).
    let per_row = |seconds: f64| seconds * 1e6 / args.events as f64;
    let sink_us = per_row(crate::drain::cpu(Some(sink.pid())));
    let nats_us = per_row(crate::drain::cpu(nats.pid()) - cpu_before.0);
    let ch_us = per_row(crate::drain::cpu(ch.pid()) - cpu_before.1);
    println!(
        "audit sink: {} rows in {:.2} s = {:.0} rows/s (from start of the sink, schema creation included; peak RSS {:.1} MiB)",
        args.events,
        secs,
        args.events as f64 / secs,
        crate::procstat::peak_rss(sink.pid()).unwrap_or(0) as f64 / 1048576.0
    );
    let together = sink_us + ch_us + nats_us;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "CPU µs/row: sink {sink_us:.1}, ClickHouse {ch_us:.1}, nats-server {nats_us:.1}; together {together:.1} ({cores} cores: at most {:.0} rows/s at these costs)",
        cores as f64 * 1e6 / together
    );

    // Delay until queryable: one event at a time.
    let mut delays = Vec::with_capacity(args.probes);
    for i in 0..args.probes {
        let id = format!("probe-{i}");
        let (headers, payload) = event(&id, args.size);
        let t = Instant::now();
        js.publish_with_headers(subjects::ingress("planner", "handoff"), headers, payload)
            .await?
            .await?;
        let sql = format!("SELECT count() FROM agentmesh.events WHERE event_id = '{id}'");
        loop {
            if count(&ch, &sql).await > 0 {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "probe {id} never became queryable"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        delays.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // `--probes 0` measures throughput only.
    if !delays.is_empty() {
        delays.sort_by(f64::total_cmp);
        let q = |p: f64| delays[((delays.len() - 1) as f64 * p) as usize];
        println!(
            "delay publish -> row queryable ({} probes, default flush: 200 ms quiet or 1 s period): p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            delays.len(),
            q(0.5),
            q(0.9),
            q(1.0)
        );
    }
    drop(sink);
    drop(ch);
    drop(nats);
    Ok(())
}
