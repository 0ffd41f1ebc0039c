//! `mesh-bench scale`: worker scale-out on a 3-node NATS cluster.
//!
//! A local cluster (`testkit::NatsCluster`) with the `MESH_*` streams at 3
//! replicas; for 1, 2 and 3 policy-worker replicas (processes sharing the
//! durable `policy-worker`, replica `i` connected to node `i` first) a
//! preloaded backlog of `--events` is drained, in an order that rotates
//! from run to run. Prints events/s, the workers' and the nodes' CPU per
//! event, and medians; checks every event was delivered once. Never fails
//! on timing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use schemas::subjects;

use crate::drain::{cpu, drained, median, messages, preload, reset, spread};
use crate::{Service, sibling};

/// Options of `mesh-bench scale`.
#[derive(Debug, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Events in each backlog.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Runs of every worker count.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Worker replica counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    workers: Vec<usize>,
    /// The policy directory the workers load.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
}

/// One drain: seconds, and CPU µs per event of the workers and the nodes.
#[derive(Debug, Clone, Copy)]
struct Drain {
    workers: usize,
    seconds: f64,
    workers_cpu_us: f64,
    nodes_cpu_us: f64,
}

pub(crate) async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    if args.workers.is_empty() || args.runs == 0 || args.workers.contains(&0) {
        bail!("nothing to run: give --workers (each at least 1) and --runs");
    }
    let cluster = testkit::NatsCluster::start().await?;
    let js = jetstream::new(cluster.connect().await?);
    let r3 = broker_config::Options {
        replicas: 3,
        ..Default::default()
    };
    broker_config::apply(&js, &r3).await?;
    let me = std::env::current_exe()?;
    let worker = sibling(&me, "policy-worker")?;
    let node_pids: Vec<Option<u32>> = (0..cluster.len()).map(|i| cluster.pid(i)).collect();
    let nodes_cpu = || node_pids.iter().map(|p| cpu(*p)).sum::<f64>();
    println!(
        "mesh-bench scale: 3-node NATS cluster, streams at 3 replicas, durability {} (AGENTMESH_DURABILITY); {} events of {} B per backlog, {} runs, policies `{}`, {} CPUs; time from the first worker's start until the backlog is acked",
        testkit::nats_durability(),
        args.events,
        args.size,
        args.runs,
        args.policies.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<4} {:>8} {:>10} {:>8} {:>12} {:>12}",
        "run", "workers", "events/s", "secs", "workers µs", "3 nodes µs"
    );
    let n = args.events;
    let mut results = Vec::new();
    for run in 0..args.runs {
        let mut order = args.workers.clone();
        let shift = run % order.len();
        order.rotate_left(shift);
        for count in order {
            reset(&js).await?;
            let tag = format!("s{run}{}", uuid::Uuid::now_v7().simple());
            preload(&js, &tag, n, args.size).await?;
            let stored = messages(&js, subjects::STREAM_INGRESS).await?;
            if stored != n {
                bail!("preloaded {stored} events instead of {n}");
            }
            let nodes_before = nodes_cpu();
            let started = Instant::now();
            let mut replicas = Vec::new();
            for i in 0..count {
                let mut c = std::process::Command::new(&worker);
                c.args([
                    "--nats-url",
                    &cluster.url_from(i % cluster.len()),
                    "--stream-replicas",
                    "3",
                    "--no-watch",
                    "--policies",
                ])
                .arg(&args.policies);
                replicas.push(Service::spawn("policy-worker", c).await?);
            }
            let deadline = started + Duration::from_secs(600);
            while !drained(&js, subjects::STREAM_INGRESS, "policy-worker").await {
                if Instant::now() > deadline {
                    bail!("{count} workers did not drain {n} events within 600 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let seconds = started.elapsed().as_secs_f64();
            let per_event = |s: f64| s * 1e6 / n as f64;
            let workers_cpu: f64 = replicas.iter().map(|r| cpu(Some(r.pid()))).sum();
            let d = Drain {
                workers: count,
                seconds,
                workers_cpu_us: per_event(workers_cpu),
                nodes_cpu_us: per_event(nodes_cpu() - nodes_before),
            };
            drop(replicas);
            let delivered = messages(&js, subjects::STREAM_DELIVER).await?;
            let receipts = messages(&js, subjects::STREAM_DECISION).await?;
            if delivered != n || receipts != n {
                bail!(
                    "{count} workers: {delivered} deliveries and {receipts} receipts for {n} events"
                );
            }
            println!(
                "{:<4} {:>8} {:>10.0} {:>8.2} {:>12.1} {:>12.1}",
                run + 1,
                count,
                n as f64 / d.seconds,
                d.seconds,
                d.workers_cpu_us,
                d.nodes_cpu_us
            );
            results.push(d);
        }
    }
    println!("\nmedians over {} runs (min–max):", args.runs);
    for &count in &args.workers {
        let of: Vec<Drain> = results
            .iter()
            .filter(|d| d.workers == count)
            .copied()
            .collect();
        let rates: Vec<f64> = of.iter().map(|d| n as f64 / d.seconds).collect();
        let (lo, hi) = spread(&rates);
        println!(
            "{count} worker(s): {:>7.0} events/s ({lo:.0}–{hi:.0}); workers {:.1} µs, nodes {:.1} µs CPU per event",
            median(rates.clone()),
            median(of.iter().map(|d| d.workers_cpu_us).collect()),
            median(of.iter().map(|d| d.nodes_cpu_us).collect()),
        );
    }
    Ok(())
}
