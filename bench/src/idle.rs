//! `mesh-bench idle-agents`: the policy worker's backlog drain with many
//! registered but idle agents, each with its durables on `MESH_DELIVER`
//! and `MESH_CALL` (as `meshctl agents add` or the SDK create them).
//!
//! Every drain runs on a fresh private nats-server: the idle agents'
//! durables are created first, then `--events` handoffs (planner → coder,
//! none of them for an idle agent) are preloaded into `MESH_INGRESS`, and
//! the worker is started and timed until its consumer has nothing pending
//! or unacked. The agent counts alternate in order from run to run; CPU is
//! per process over the drain. Never fails on timing.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use broker_config::server::Durability;
use futures::StreamExt;
use schemas::subjects;

use crate::drain::{cpu, drained, median, preload, sync_interval};
use crate::{Service, sibling};

/// Options of `mesh-bench idle-agents`.
#[derive(Debug, clap::Args)]
pub(crate) struct IdleArgs {
    /// Events in each drain's backlog.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Idle agents registered before each drain, in the first run's order.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    agents: Vec<usize>,
    /// Runs of every agent count (each in a rotated order).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// The policy directory the worker loads.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// The nats-server's durability: `always` or `interval`.
    #[arg(long, default_value = "always")]
    durability: Durability,
}

/// One drain's figures.
struct Drain {
    agents: usize,
    rate: f64,
    worker_us: f64,
    nats_us: f64,
    nats_rss_mib: f64,
    setup_secs: f64,
}

/// Creates `n` idle agents' durables (deliveries and tool calls), 64
/// creations in flight.
async fn register(js: &jetstream::Context, n: usize) -> anyhow::Result<()> {
    let deliver = js.get_stream(subjects::STREAM_DELIVER).await?;
    let call = js.get_stream(subjects::STREAM_CALL).await?;
    let creations = futures::stream::iter(0..n)
        .map(|i| {
            let (deliver, call) = (deliver.clone(), call.clone());
            async move {
                let id = format!("idle-{i:05}");
                deliver
                    .create_consumer(broker_config::agent_consumer_config(&id))
                    .await?;
                call.create_consumer(broker_config::agent_calls_consumer_config(&id))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64);
    futures::pin_mut!(creations);
    while let Some(created) = creations.next().await {
        if let Err(error) = created {
            let info = js
                .get_stream(subjects::STREAM_DELIVER)
                .await?
                .get_info()
                .await?;
            bail!(
                "registering {n} idle agents: {error} ({} consumers on MESH_DELIVER, its max_consumers {})",
                info.state.consumer_count,
                info.config.max_consumers
            );
        }
    }
    let consumers = deliver.get_info().await?.state.consumer_count;
    if consumers < n {
        bail!("{consumers} consumers on MESH_DELIVER after registering {n} agents");
    }
    Ok(())
}

async fn drain(args: &IdleArgs, run: usize, agents: usize) -> anyhow::Result<Drain> {
    let nats = testkit::NatsServer::start_with(testkit::Store {
        sync_interval: Some(sync_interval(args.durability)),
        ..Default::default()
    })
    .await?;
    let mut js = jetstream::new(nats.connect().await?);
    js.set_timeout(crate::ACK_TIMEOUT);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let setup = Instant::now();
    register(&js, agents).await?;
    let setup_secs = setup.elapsed().as_secs_f64();
    let tag = format!("i{run}a{agents}{}", uuid::Uuid::now_v7().simple());
    preload(&js, &tag, args.events, args.size, 1).await?;
    let me = std::env::current_exe()?;
    let mut c = Command::new(sibling(&me, "policy-worker")?);
    c.args(["--nats-url", &nats.url(), "--no-watch", "--policies"])
        .arg(&args.policies);
    let worker = Service::spawn("policy-worker", c).await?;
    let before = (cpu(Some(worker.pid())), cpu(nats.pid()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    while !drained(&js, subjects::STREAM_INGRESS, "policy-worker").await {
        if Instant::now() > deadline {
            bail!(
                "the worker did not drain {} events within 600 s",
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let per_event = |after: f64, before: f64| (after - before) * 1e6 / args.events as f64;
    let result = Drain {
        agents,
        rate: args.events as f64 / secs,
        worker_us: per_event(cpu(Some(worker.pid())), before.0),
        nats_us: per_event(cpu(nats.pid()), before.1),
        nats_rss_mib: nats.pid().and_then(crate::procstat::peak_rss).unwrap_or(0) as f64
            / 1048576.0,
        setup_secs,
    };
    let delivered = crate::drain::messages(&js, subjects::STREAM_DELIVER).await?;
    if delivered != args.events {
        bail!(
            "{delivered} deliveries for {} events with {agents} idle agents",
            args.events
        );
    }
    drop(worker);
    drop(nats);
    Ok(result)
}

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<()> {
    println!(
        "mesh-bench idle-agents: {} events of {} B per drain, idle agents {:?}, {} runs, durability {}",
        args.events,
        args.size,
        args.agents,
        args.runs,
        sync_interval(args.durability)
    );
    let mut all = Vec::new();
    for run in 0..args.runs {
        let mut order = args.agents.clone();
        let len = order.len().max(1);
        order.rotate_left(run % len);
        for agents in order {
            let d = drain(&args, run, agents).await?;
            println!(
                "run {run}: {:>6} idle agents: {:>8.0} events/s, worker {:.1} µs/event, nats-server {:.1} µs/event, nats-server peak RSS {:.0} MiB (registering took {:.1} s)",
                d.agents, d.rate, d.worker_us, d.nats_us, d.nats_rss_mib, d.setup_secs
            );
            all.push(d);
        }
    }
    let base = median(
        all.iter()
            .filter(|d| d.agents == args.agents[0])
            .map(|d| d.rate)
            .collect(),
    );
    println!("medians over {} runs:", args.runs);
    for &agents in &args.agents {
        let mine: Vec<&Drain> = all.iter().filter(|d| d.agents == agents).collect();
        let rate = median(mine.iter().map(|d| d.rate).collect());
        println!(
            "{agents:>6} idle agents: {rate:>8.0} events/s ({:.2}× {} agents), worker {:.1} µs/event, nats-server {:.1} µs/event",
            rate / base,
            args.agents[0],
            median(mine.iter().map(|d| d.worker_us).collect()),
            median(mine.iter().map(|d| d.nats_us).collect()),
        );
    }
    Ok(())
}
