//! The fault run: under sustained load, kill -9 the policy worker and
//! restart it, stop ClickHouse and start it again, restart nats-server —
//! then count what arrived. Expected: nothing lost, nothing delivered twice,
//! no duplicate row visible through `FINAL` (as the shipped queries read).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use schemas::{DecisionReceipt, subjects};

use testkit::load::event;

use crate::{Service, sibling};

/// Options of `mesh-bench faults`.
#[derive(Debug, clap::Args)]
pub(crate) struct FaultArgs {
    /// Events per second the load keeps up.
    #[arg(long, default_value_t = 300)]
    rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 80)]
    secs: u64,
    /// Seconds ClickHouse stays stopped.
    #[arg(long, default_value_t = 30)]
    clickhouse_down_secs: u64,
    /// The shipped policy directory.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
}

/// Every message of `stream` (an ordered consumer reads them all).
async fn read_all(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let mut s = js.get_stream(stream).await?;
    let total = s.info().await?.state.messages as usize;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => out.push(m),
            Ok(Some(Err(e))) => anyhow::bail!("reading {stream}: {e}"),
            _ => break,
        }
    }
    Ok(out)
}

async fn scalar(ch: &testkit::ClickHouseServer, sql: &str) -> String {
    ch.query_text(sql)
        .await
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|e| format!("error: {e}"))
}

pub(crate) async fn run(args: FaultArgs) -> anyhow::Result<()> {
    let mut nats = testkit::NatsServer::start().await?;
    let mut ch = testkit::ClickHouseServer::start().await?;
    let url = nats.url();
    let js = jetstream::new(async_nats::connect(&url).await?);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let me = std::env::current_exe()?;
    let worker_cmd = || -> anyhow::Result<Command> {
        let mut c = Command::new(sibling(&me, "policy-worker")?);
        c.args(["--nats-url", &url, "--ack-wait-secs", "5", "--policies"])
            .arg(&args.policies);
        Ok(c)
    };
    let mut sink_cmd = Command::new(sibling(&me, "audit-sink")?);
    sink_cmd.args([
        "--nats-url",
        &url,
        "--clickhouse-url",
        &ch.url(),
        "--database",
        "agentmesh",
    ]);
    let mut worker = Service::spawn("policy-worker", worker_cmd()?).await?;
    let _sink = Service::spawn("audit-sink", sink_cmd).await?;

    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let published = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let total = args.rate * args.secs;
    let load = {
        let (url, run_id, published, retries) = (
            url.clone(),
            run_id.clone(),
            published.clone(),
            retries.clone(),
        );
        let rate = args.rate;
        tokio::spawn(async move {
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(&url)
                .await?;
            let js = jetstream::new(client);
            let start = Instant::now();
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let (subject, headers, body) = event(&run_id, i);
                // Retry until stored: the same Nats-Msg-Id makes a retry of
                // a publish that did land a no-op.
                loop {
                    let publish = PublishMessage::build()
                        .headers(headers.clone())
                        .payload(body.clone().into());
                    let stored = match js.send_publish(subject.clone(), publish).await {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    };
                    if stored {
                        break;
                    }
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };

    let t0 = Instant::now();
    let at = |s: u64| tokio::time::sleep_until((t0 + Duration::from_secs(s)).into());
    let log = |what: &str| {
        println!(
            "[{:>5.1} s] {what} (published so far: {})",
            t0.elapsed().as_secs_f64(),
            published.load(Ordering::Relaxed)
        )
    };
    println!(
        "mesh-bench faults: {} events/s for {} s ({total} events), nats {url}, ClickHouse {}",
        args.rate,
        args.secs,
        ch.url()
    );
    at(10).await;
    worker.kill();
    log("policy-worker killed (SIGKILL)");
    at(13).await;
    worker = Service::spawn("policy-worker", worker_cmd()?).await?;
    log("policy-worker restarted");
    at(20).await;
    ch.stop()?;
    log("clickhouse-server stopped");
    at(20 + args.clickhouse_down_secs).await;
    ch.start_again().await?;
    log("clickhouse-server started again");
    at(20 + args.clickhouse_down_secs + 10).await;
    nats.restart().await?;
    log("nats-server restarted (SIGKILL, same store)");
    load.await??;
    log("load finished");

    // Drain: every event decided and every row in ClickHouse.
    let n = published.load(Ordering::Relaxed);
    let drained = testkit::eventually(Duration::from_secs(300), "the mesh to drain", || {
        let (js, ch) = (&js, &ch);
        async move {
            let receipts = js
                .get_stream(subjects::STREAM_DECISION)
                .await
                .ok()?
                .info()
                .await
                .ok()?
                .state
                .messages;
            let events = scalar(ch, "SELECT count() FROM agentmesh.events FINAL")
                .await
                .parse::<u64>()
                .ok()?;
            let decisions = scalar(ch, "SELECT count() FROM agentmesh.decisions FINAL")
                .await
                .parse::<u64>()
                .ok()?;
            (receipts >= n && events >= n && decisions >= n).then_some(())
        }
    })
    .await;
    if let Err(e) = &drained {
        println!("warning: {e}; counting what is there");
    }
    log("drained");
    drop(worker);

    let receipts: Vec<DecisionReceipt> = read_all(&js, subjects::STREAM_DECISION)
        .await?
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect();
    let mut by_decision: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &receipts {
        by_decision
            .entry(r.decision.to_string())
            .or_default()
            .insert(r.event_id.clone());
    }
    let decided: HashSet<&String> = receipts.iter().map(|r| &r.event_id).collect();
    let delivered = read_all(&js, subjects::STREAM_DELIVER).await?;
    let delivered_ids: HashSet<String> = delivered
        .iter()
        .filter_map(|m| {
            m.headers
                .as_ref()?
                .get("ce-id")
                .map(|v| v.as_str().to_owned())
        })
        .collect();
    let dead = js
        .get_stream(subjects::STREAM_DEAD)
        .await?
        .info()
        .await?
        .state
        .messages;
    let ingress = js
        .get_stream(subjects::STREAM_INGRESS)
        .await?
        .info()
        .await?
        .state
        .messages;
    let count = |d: &str| by_decision.get(d).map_or(0, HashSet::len);
    let allowed = count("allow");

    println!("\n== fault run counts");
    println!(
        "published (acked by JetStream)     {n}   (publish retries during faults: {})",
        retries.load(Ordering::Relaxed)
    );
    println!("MESH_INGRESS messages              {ingress}");
    println!(
        "receipts                           {} messages, {} distinct events",
        receipts.len(),
        decided.len()
    );
    println!(
        "  allow / deny / invalid           {allowed} / {} / {}",
        count("deny"),
        count("invalid")
    );
    println!(
        "delivered (MESH_DELIVER)           {} messages, {} distinct events",
        delivered.len(),
        delivered_ids.len()
    );
    println!("dead letters (MESH_DEAD)           {dead}");
    println!(
        "lost (published - decided)         {}",
        n as i64 - decided.len() as i64
    );
    println!(
        "lost deliveries (allowed - delivered) {}",
        allowed as i64 - delivered_ids.len() as i64
    );
    println!(
        "duplicate deliveries               {}",
        delivered.len() - delivered_ids.len()
    );
    let ev = scalar(&ch, "SELECT count(), uniqExact(event_id), sum(valid = 0) FROM agentmesh.events FINAL FORMAT TSV").await;
    let de = scalar(
        &ch,
        "SELECT count(), uniqExact(event_id) FROM agentmesh.decisions FINAL FORMAT TSV",
    )
    .await;
    let raw = scalar(&ch, "SELECT count() FROM agentmesh.events").await;
    println!(
        "ClickHouse events FINAL            rows, distinct ids, invalid: {}",
        ev.replace('\t', ", ")
    );
    println!(
        "ClickHouse decisions FINAL         rows, distinct ids: {}",
        de.replace('\t', ", ")
    );
    println!(
        "ClickHouse events before FINAL     {raw} rows (duplicates written during faults collapse under FINAL)"
    );
    Ok(())
}
