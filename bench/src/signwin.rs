//! `mesh-bench sign-window`: what the signer's collection window
//! (`--sign-window-us`) does to batch sizes, signing cost and latency in an
//! open loop.
//!
//! For every window (alternating in order from run to run) a fresh private
//! nats-server and a policy worker with that window take open-loop phases
//! at each `--rates` rate; the worker's `agentmesh_worker_sign_batch`
//! histogram is read from its `/metrics` before and after each phase. The
//! signing CPU per event follows from the signatures and decisions of the
//! phase and two costs measured in this process on this machine: one
//! Ed25519 signature (`S`) and the per-decision Merkle work (`c`, from
//! batches of 256): `S × signatures / decisions + c`. Never fails on timing.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use broker_config::server::Durability;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::drain::{median, sync_interval};
use crate::{Service, load, percentiles, procstat, sibling};

/// Options of `mesh-bench sign-window`.
#[derive(Debug, clap::Args)]
pub(crate) struct SignWindowArgs {
    /// Collection windows to compare, in microseconds, in the first run's order.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,2000")]
    windows: Vec<u64>,
    /// Open-loop rates (events/s), each a phase of `--secs` seconds.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000")]
    rates: Vec<f64>,
    /// Seconds of each open-loop phase.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Runs of every window (each in a rotated order).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// The policy directory the worker loads.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// The nats-server's durability: `always` or `interval`.
    #[arg(long, default_value = "always")]
    durability: Durability,
}

/// `GET /metrics` of the service on `port`.
async fn metrics(port: u16) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connecting to the worker's /metrics")?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// (signatures, decisions) so far: the sign-batch histogram's count and sum.
async fn signatures(port: u16) -> anyhow::Result<(f64, f64)> {
    let text = metrics(port).await?;
    Ok((
        testkit::metrics::sample_value(&text, "agentmesh_worker_sign_batch_count"),
        testkit::metrics::sample_value(&text, "agentmesh_worker_sign_batch_sum"),
    ))
}

/// CPU seconds per call of `seal_batch` on `n` decisions, on this thread.
fn seal_cost(n: usize, reps: usize) -> f64 {
    let key = schemas::signing::SigningKey::generate();
    let batch: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("decision-{i}-{}", "x".repeat(300)).into_bytes())
        .collect();
    let started = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(key.seal_batch(&batch).ok());
    }
    started.elapsed().as_secs_f64() / reps as f64
}

/// One phase's figures.
struct Phase {
    window_us: u64,
    rate: f64,
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_batch: f64,
    sign_us: f64,
    worker_us: f64,
}

pub(crate) async fn run(args: SignWindowArgs) -> anyhow::Result<()> {
    // Best of three: the machine is shared.
    let single = (0..3).map(|_| seal_cost(1, 2000)).fold(f64::MAX, f64::min);
    let per_256 = (0..3).map(|_| seal_cost(256, 40)).fold(f64::MAX, f64::min);
    let marginal = ((per_256 - single) / 255.0).max(0.0);
    let signature = (single - marginal).max(0.0);
    println!(
        "mesh-bench sign-window: signing on this machine: one decision alone {:.1} µs; in batches of 256 {:.2} µs each (one Ed25519 signature S = {:.1} µs, Merkle work c = {:.2} µs per decision); durability {}",
        single * 1e6,
        per_256 / 256.0 * 1e6,
        signature * 1e6,
        marginal * 1e6,
        sync_interval(args.durability)
    );
    let clock = load::Clock::new();
    let me = std::env::current_exe()?;
    let mut all = Vec::new();
    for run in 0..args.runs {
        let mut order = args.windows.clone();
        let len = order.len().max(1);
        order.rotate_left(run % len);
        for window_us in order {
            let nats = testkit::NatsServer::start_with(testkit::Store {
                sync_interval: Some(sync_interval(args.durability)),
                ..Default::default()
            })
            .await?;
            let js = async_nats::jetstream::new(nats.connect().await?);
            broker_config::apply(&js, &broker_config::Options::default()).await?;
            let port = testkit::free_port()?;
            let mut c = Command::new(sibling(&me, "policy-worker")?);
            c.args(["--nats-url", &nats.url(), "--no-watch", "--policies"])
                .arg(&args.policies)
                .args(["--sign-window-us", &window_us.to_string()])
                .args(["--http-port", &port.to_string(), "--http-host", "127.0.0.1"]);
            let worker = Service::spawn("policy-worker", c).await?;
            let receiver = load::Receiver::start(&nats.url(), clock.clone()).await?;
            let mut publisher =
                load::Publisher::new(&nats.url(), args.size, 2048, clock.clone()).await?;
            // Warm-up: connections, caches.
            load::closed_phase(&mut publisher, &receiver, 500).await?;
            for &rate in &args.rates {
                let before = signatures(port).await?;
                let cpu_before = procstat::cpu_seconds(worker.pid()).unwrap_or(0.0);
                let phase = load::open_phase(
                    &mut publisher,
                    &receiver,
                    rate,
                    Duration::from_secs(args.secs),
                )
                .await?;
                let cpu = procstat::cpu_seconds(worker.pid()).unwrap_or(0.0) - cpu_before;
                let after = signatures(port).await?;
                let (count, sum) = (after.0 - before.0, after.1 - before.1);
                let ms = |q: f64| phase.latency_us.value_at_quantile(q) as f64 / 1000.0;
                let p = Phase {
                    window_us,
                    rate,
                    delivered: phase.rate(),
                    p50_ms: ms(0.5),
                    p99_ms: ms(0.99),
                    mean_batch: if count > 0.0 { sum / count } else { 0.0 },
                    sign_us: if sum > 0.0 {
                        (signature * count / sum + marginal) * 1e6
                    } else {
                        0.0
                    },
                    worker_us: cpu * 1e6 / phase.events.max(1) as f64,
                };
                println!(
                    "run {run}: window {:>5} µs, offered {:>5.0}/s: delivered {:>6.0}/s, p50/p90/p99/p99.9 ms {}, mean sign batch {:>6.1}, signing ≈ {:>5.2} µs/event, worker CPU {:>6.1} µs/event",
                    p.window_us,
                    p.rate,
                    p.delivered,
                    percentiles(&phase.latency_us),
                    p.mean_batch,
                    p.sign_us,
                    p.worker_us
                );
                all.push(p);
            }
            drop(worker);
            drop(nats);
        }
    }
    println!("medians over {} runs:", args.runs);
    for &rate in &args.rates {
        for &window_us in &args.windows {
            let mine: Vec<&Phase> = all
                .iter()
                .filter(|p| p.window_us == window_us && p.rate == rate)
                .collect();
            let m = |f: fn(&Phase) -> f64| median(mine.iter().map(|p| f(p)).collect());
            println!(
                "offered {rate:>5.0}/s, window {window_us:>5} µs: delivered {:>6.0}/s, p50 {:.2} ms, p99 {:.2} ms, mean sign batch {:.1}, signing ≈ {:.2} µs/event, worker CPU {:.1} µs/event",
                m(|p| p.delivered),
                m(|p| p.p50_ms),
                m(|p| p.p99_ms),
                m(|p| p.mean_batch),
                m(|p| p.sign_us),
                m(|p| p.worker_us)
            );
        }
    }
    Ok(())
}
