//! Reaction-time benchmark: how long from a backlog change to the lease
//! decision, as a worker sees it through `watch_pool`.
//!
//! Each trial publishes one message for an idle pool (backlog 0 -> 1) and
//! times until the worker's watch yields the granted GPU; then drains it
//! (backlog 1 -> 0, cooldown 0) and times until the watch yields the
//! release. A random pause between trials spreads the changes over the
//! whole poll interval. Prints p50/p90/p99/max.
//!
//! ```text
//! cargo run --release -p gpu-scaler --example reaction_bench -- [TRIALS] [INTERVAL_MS]
//! ```
//!
//! Starts its own nats-server (from PATH or `NATS_SERVER_BIN`), or uses
//! `NATS_URL` when set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use gpu_pools::{ConfigFile, DeclaredGpu, DeclaredInventory, InventoryMode, PoolConfig};
use gpu_scaler::{AssignedGpu, Scaler};
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{what:<10} n={:<5} p50={:>7.1} ms  p90={:>7.1} ms  p99={:>7.1} ms  max={:>7.1} ms  mean={:>7.1} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 90.0)),
        ms(percentile(&samples, 99.0)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
        ms(mean),
    );
}

async fn next_set<S>(watch: &mut S) -> anyhow::Result<Vec<AssignedGpu>>
where
    S: futures::Stream<Item = Result<Vec<AssignedGpu>, gpu_scaler::Error>> + Unpin,
{
    let set = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .context("no lease change within 10 s")?
        .context("watch ended")??;
    Ok(set)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let trials: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let interval_ms: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(250);
    let interval = Duration::from_millis(interval_ms);

    let (_server, url) = match std::env::var("NATS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = testkit::NatsServer::start().await?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let pool_name = format!("bench{}", std::process::id());
    let stream = js.get_stream("MESH_DELIVER").await?;
    let consumer = stream
        .get_or_create_consumer(
            &pool_name,
            pull::Config {
                durable_name: Some(pool_name.clone()),
                filter_subject: format!("mesh.deliver.{pool_name}.>"),
                ..Default::default()
            },
        )
        .await?;

    let gpu = format!("GPU-bench-{}", std::process::id());
    let config = ConfigFile {
        poll_interval: interval,
        lease_ttl: Duration::from_secs(15).max(interval * 4),
        inventory: InventoryMode::Declared,
        gpus: vec![DeclaredGpu {
            uuid: gpu.clone(),
            name: "bench".into(),
            memory_total_mib: 0,
            healthy: true,
        }],
        pools: [(
            pool_name.clone(),
            PoolConfig {
                stream: "MESH_DELIVER".into(),
                consumers: vec![pool_name.clone()],
                subjects: vec![],
                target_backlog_per_gpu: 1,
                min_gpus: 0,
                max_gpus: 1,
                cooldown: Duration::ZERO,
            },
        )]
        .into(),
    };
    let inventory = Arc::new(DeclaredInventory::new(&config.gpus));
    // The scaler gets its own connection, as a separate process would.
    let scaler = Scaler::new(
        async_nats::connect(&url).await?,
        config,
        "bench".into(),
        inventory,
    )
    .await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(scaler.run(shutdown.clone()));

    let mut watch = Box::pin(gpu_scaler::watch_pool(&js, &pool_name).await?);
    anyhow::ensure!(
        next_set(&mut watch).await?.is_empty(),
        "pool not idle at start"
    );

    println!(
        "reaction time, backlog change -> lease seen by the worker (watch_pool); poll interval {interval_ms} ms, {trials} trials"
    );
    let subject = format!("mesh.deliver.{pool_name}.bench");
    let (mut up, mut down) = (Vec::with_capacity(trials), Vec::with_capacity(trials));
    for _ in 0..trials {
        // Land the change at a random phase of the poll interval.
        let phase = uuid::Uuid::new_v4().as_u128() % u128::from(interval_ms.max(1));
        tokio::time::sleep(Duration::from_millis(phase as u64)).await;

        js.publish(subject.clone(), "work".into()).await?.await?;
        let changed = Instant::now();
        let set = next_set(&mut watch).await?;
        up.push(changed.elapsed());
        anyhow::ensure!(
            set.len() == 1 && set[0].uuid == gpu,
            "unexpected set {set:?}"
        );

        let phase = uuid::Uuid::new_v4().as_u128() % u128::from(interval_ms.max(1));
        tokio::time::sleep(Duration::from_millis(phase as u64)).await;
        let mut batch = consumer.fetch().max_messages(10).messages().await?;
        let mut drained = 0;
        while let Some(msg) = batch.next().await {
            msg.map_err(|e| anyhow::anyhow!(e))?
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            drained += 1;
        }
        anyhow::ensure!(drained == 1, "expected one message, drained {drained}");
        let changed = Instant::now();
        let set = next_set(&mut watch).await?;
        down.push(changed.elapsed());
        anyhow::ensure!(set.is_empty(), "unexpected set {set:?}");
    }
    report("scale-up", up.clone());
    report("scale-down", down.clone());
    let mut all = up;
    all.extend(down);
    report("both", all);

    shutdown.cancel();
    let _ = task.await;
    Ok(())
}
