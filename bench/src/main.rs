//! `mesh-bench`: measures the policy worker against a raw JetStream hop on
//! the same servers in the same run, and prints events/s, latency
//! percentiles, peak RSS and CPU per 10k events; `mesh-bench cache` times
//! repeated tool calls with and without the tool-result cache. It never
//! fails on timing.
//!
//! `mesh-bench run` starts a private `nats-server -js` unless `NATS_URL` is
//! set; the services run as child processes found next to this binary
//! (`cargo build --release -p bench -p policy-worker`).

mod agents;
mod cache;
mod drain;
mod faults;
mod forwarder;
mod idle;
mod load;
mod mcp;
mod procstat;
mod scale;
mod signwin;
mod sink;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

/// How long the bench's own publishers wait for a JetStream ack.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Benchmarks for agentmesh.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Raw forwarder vs policy worker (shipped and generated policies), closed and open loop.
    Run(RunArgs),
    /// Drain a preloaded backlog: 1- and 2-write raw forwarders, the policy worker, the worker with the audit sink; alternating order, several runs, medians.
    Drain(drain::DrainArgs),
    /// The audit sink's rows/s into ClickHouse and the delay until a row is queryable.
    Sink(sink::SinkArgs),
    /// Repeated tool calls through the real stack, cached vs uncached, and a workflow's hit rate.
    Cache(cache::CacheArgs),
    /// An SDK agent draining a backlog (against a plain JetStream consumer) and answering tool calls meanwhile.
    Agents(agents::AgentsArgs),
    /// MCP tools/call round trip through the MCP gateway beside the same call with the SDK, at 1 and 10 concurrent clients.
    Mcp(mcp::McpArgs),
    /// Fault run: kill -9 the policy worker, stop ClickHouse, restart nats-server, under load; count what arrived.
    Faults(faults::FaultArgs),
    /// Worker scale-out on a local 3-node NATS cluster (streams at 3 replicas): a backlog drained by 1, 2 and 3 policy-worker replicas.
    Scale(scale::ScaleArgs),
    /// The worker's backlog drain with 0 / 1,000 / 10,000 idle registered agents (their durables on MESH_DELIVER and MESH_CALL), alternating, on fresh servers.
    IdleAgents(idle::IdleArgs),
    /// The policy worker's signing window: sign-batch sizes, signing CPU per event and open-loop latency for several `--sign-window-us`, alternating, on fresh servers.
    SignWindow(signwin::SignWindowArgs),
    /// Run the raw forwarder (used by `run` as a child process).
    Forward {
        /// NATS server URL.
        #[arg(long, env = "NATS_URL", default_value = broker_config::DEFAULT_NATS_URL)]
        nats_url: String,
        /// Messages requested per pull.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Events in flight.
        #[arg(long, default_value_t = 512)]
        max_in_flight: usize,
        /// Also publish a JSON receipt per event (two stored writes, as the mesh contract asks).
        #[arg(long)]
        receipt: bool,
        /// File created once consuming.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Use this NATS server instead of starting a private one. Its MESH_* streams are purged.
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    /// Events in each closed-loop phase.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Seconds of each open-loop phase.
    #[arg(long, default_value_t = 5)]
    open_secs: u64,
    /// Event data sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    sizes: Vec<usize>,
    /// Generated policies added to the shipped set for the second worker run (0 to skip).
    #[arg(long, default_value_t = 1000)]
    generated: usize,
    /// The shipped policy directory.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// Unacknowledged publishes the load generator keeps open.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Open-loop phases at these fixed rates (events/s) after the others,
    /// e.g. `2000,5000`; each target gets the same offered load.
    #[arg(long, value_delimiter = ',')]
    open_rates: Vec<f64>,
    /// The private nats-server's durability: `always` (every write
    /// fsynced before it is acknowledged, the stack's default),
    /// `interval` (nats-server's 2-minute flush), or both
    /// (`always,interval`: each target runs under both, back to back,
    /// alternating which goes first). Ignored with `--nats-url`.
    #[arg(long, value_delimiter = ',', default_value = "always")]
    durability: Vec<broker_config::server::Durability>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Forward {
            nats_url,
            batch,
            max_in_flight,
            receipt,
            ready_file,
        } => forwarder::run(&nats_url, batch, max_in_flight, receipt, ready_file).await,
        Cmd::Run(args) => run(args).await,
        Cmd::Drain(args) => drain::run(args).await,
        Cmd::Sink(args) => sink::run(args).await,
        Cmd::Faults(args) => faults::run(args).await,
        Cmd::Scale(args) => scale::run(args).await,
        Cmd::Cache(args) => cache::run(args).await,
        Cmd::Agents(args) => agents::run(args).await,
        Cmd::Mcp(args) => mcp::run(args).await,
        Cmd::IdleAgents(args) => idle::run(args).await,
        Cmd::SignWindow(args) => signwin::run(args).await,
    }
}

#[derive(Debug, Clone)]
enum Target {
    /// The raw forwarder; with `receipt`, it also stores a receipt per
    /// event (the mesh contract's two stored writes).
    Raw {
        receipt: bool,
    },
    Worker {
        label: String,
        policies: PathBuf,
    },
}

impl Target {
    fn label(&self) -> &str {
        match self {
            Self::Raw { receipt: false } => "raw forwarder",
            Self::Raw { receipt: true } => "raw forwarder, 2 writes",
            Self::Worker { label, .. } => label,
        }
    }
    fn consumer(&self) -> &'static str {
        match self {
            Self::Raw { .. } => forwarder::CONSUMER,
            Self::Worker { .. } => "policy-worker",
        }
    }
}

/// A service under test, as a child process.
struct Service {
    child: Child,
    _ready: tempfile::TempDir,
}

impl Service {
    async fn start(target: &Target, nats_url: &str) -> anyhow::Result<Self> {
        let me = std::env::current_exe()?;
        let cmd = match target {
            Target::Raw { receipt } => {
                let mut c = Command::new(&me);
                c.args(["forward", "--nats-url", nats_url]);
                if *receipt {
                    c.arg("--receipt");
                }
                c
            }
            Target::Worker { policies, .. } => {
                let mut c = Command::new(sibling(&me, "policy-worker")?);
                c.args(["--nats-url", nats_url, "--no-watch", "--policies"])
                    .arg(policies);
                c
            }
        };
        Self::spawn(target.label(), cmd).await
    }

    /// Starts `cmd --ready-file <tmp>` and waits for the ready file.
    async fn spawn(label: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let ready_dir = tempfile::tempdir()?;
        let ready = ready_dir.path().join("ready");
        let mut child = cmd
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        let started = testkit::eventually(
            Duration::from_secs(60),
            "the service to become ready",
            || {
                let ready = ready.exists();
                let exited = child.try_wait().ok().flatten().is_some();
                async move { (ready || exited).then_some(ready) }
            },
        )
        .await?;
        if !started {
            bail!("{label} exited at start");
        }
        Ok(Self {
            child,
            _ready: ready_dir,
        })
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sibling(me: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = me.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "`{}` not found next to mesh-bench: build both with `cargo build --release -p bench -p {name}`",
            path.display()
        )
    }
}

/// Purges the MESH_* streams and removes the consumer of the last phase,
/// so every phase starts from empty streams.
async fn reset(js: &async_nats::jetstream::Context, consumer: &str) -> anyhow::Result<()> {
    use schemas::subjects::*;
    for name in [STREAM_INGRESS, STREAM_DELIVER, STREAM_DECISION, STREAM_DEAD] {
        let stream = js.get_stream(name).await?;
        stream.purge().await?;
        let _ = stream.delete_consumer(consumer).await;
    }
    Ok(())
}

fn generate_policies(shipped: &Path, n: usize) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for entry in
        std::fs::read_dir(shipped).with_context(|| format!("reading `{}`", shipped.display()))?
    {
        let path = entry?.path();
        if path.is_file()
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, dir.path().join(name))?;
        }
    }
    let text = policy_engine::generated_policies(n);
    std::fs::write(dir.path().join("generated.cedar"), text)?;
    Ok(dir)
}

fn percentiles(h: &Histogram<u64>) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999)
    )
}

struct Row {
    label: String,
    durability: broker_config::server::Durability,
    closed: load::PhaseResult,
    open: load::PhaseResult,
    /// Open-loop phases at fixed offered rates.
    fixed: Vec<(f64, load::PhaseResult)>,
    rss_mib: f64,
    cpu_per_10k: f64,
}

/// The Go collector settings the bench's own nats-servers inherit from
/// this environment (`GOGC`, `GOMEMLIMIT`; Go's defaults where unset).
pub(crate) fn gc_settings() -> String {
    ["GOGC", "GOMEMLIMIT"]
        .iter()
        .map(|name| {
            let value = std::env::var(name).unwrap_or_else(|_| "unset".to_owned());
            format!("{name} {value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The NATS server a target runs against: a fresh private one per target
/// (nothing the previous target stored, no heap it grew: nats-server's
/// garbage collector pauses grow with its heap and show in the tail), or
/// the `--nats-url` one with its `MESH_*` streams purged.
async fn server_for(
    args: &RunArgs,
    target: &Target,
    durability: broker_config::server::Durability,
) -> anyhow::Result<(Option<testkit::NatsServer>, String)> {
    let server = match &args.nats_url {
        Some(_) => None,
        None => Some(
            testkit::NatsServer::start_with(testkit::Store {
                sync_interval: Some(drain::sync_interval(durability)),
                ..Default::default()
            })
            .await?,
        ),
    };
    let nats_url = args
        .nats_url
        .clone()
        .or_else(|| server.as_ref().map(|s| s.url()))
        .context("no NATS server")?;
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    reset(&js, target.consumer()).await?;
    Ok((server, nats_url))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let generated = (args.generated > 0)
        .then(|| generate_policies(&args.policies, args.generated))
        .transpose()?;
    let mut targets = vec![
        Target::Raw { receipt: false },
        Target::Raw { receipt: true },
        Target::Worker {
            label: "policy worker, shipped policies".into(),
            policies: args.policies.clone(),
        },
    ];
    if let Some(dir) = &generated {
        targets.push(Target::Worker {
            label: format!("policy worker, +{} policies", args.generated),
            policies: dir.path().to_owned(),
        });
    }

    if args.durability.is_empty() {
        bail!("nothing to run: give --durability always, interval or both");
    }
    let private = format!(
        "a fresh private nats-server per target ({}; sync_interval {})",
        gc_settings(),
        args.durability
            .iter()
            .map(|d| drain::sync_interval(*d))
            .collect::<Vec<_>>()
            .join(" and ")
    );
    println!(
        "mesh-bench: nats {}, {} events per closed-loop phase, {} s open loop, window {}",
        args.nats_url.as_deref().unwrap_or(&private),
        args.events,
        args.open_secs,
        args.window
    );
    let clock = load::Clock::new();
    for &size in &args.sizes {
        println!("\n== {size} B events");
        println!(
            "{:<36} {:>10} {:>8} {:>8} {:>8} {:>8}   {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11}",
            "target",
            "closed ev/s",
            "p50 ms",
            "p90",
            "p99",
            "p99.9",
            "open ev/s",
            "p50 ms",
            "p90",
            "p99",
            "p99.9",
            "peak RSS",
            "CPU s/10k"
        );
        let mut rows = Vec::new();
        // Each target under each setting back to back, the setting that
        // goes first alternating from target to target.
        let runs = targets.iter().enumerate().flat_map(|(i, target)| {
            let mut settings = args.durability.clone();
            let shift = i % settings.len();
            settings.rotate_left(shift);
            settings.into_iter().map(move |d| (target, d))
        });
        for (target, durability) in runs {
            let (server, nats_url) = server_for(&args, target, durability).await?;
            let service = Service::start(target, &nats_url).await?;
            let cpu_before = procstat::cpu_seconds(service.pid()).unwrap_or(0.0);
            let receiver = load::Receiver::start(&nats_url, clock.clone()).await?;
            let mut publisher =
                load::Publisher::new(&nats_url, size, args.window, clock.clone()).await?;
            // A short warm-up so connections and caches are hot.
            load::closed_phase(&mut publisher, &receiver, (args.events / 20).max(100)).await?;
            let closed = load::closed_phase(&mut publisher, &receiver, args.events).await?;
            let open = load::open_phase(
                &mut publisher,
                &receiver,
                closed.rate() / 2.0,
                Duration::from_secs(args.open_secs),
            )
            .await?;
            let mut fixed = Vec::new();
            for &rate in &args.open_rates {
                let phase = load::open_phase(
                    &mut publisher,
                    &receiver,
                    rate,
                    Duration::from_secs(args.open_secs),
                )
                .await?;
                fixed.push((rate, phase));
            }
            let cpu = procstat::cpu_seconds(service.pid()).unwrap_or(0.0) - cpu_before;
            let total = (args.events / 20).max(100)
                + closed.events
                + open.events
                + fixed.iter().map(|(_, p)| p.events).sum::<u64>();
            let row = Row {
                label: format!("{} [{durability}]", target.label()),
                durability,
                rss_mib: procstat::peak_rss(service.pid()).unwrap_or(0) as f64 / (1024.0 * 1024.0),
                cpu_per_10k: cpu / total as f64 * 10_000.0,
                closed,
                open,
                fixed,
            };
            println!(
                "{:<36} {:>10.0} {}   {:>10.0} {} {:>6.1} MiB {:>11.3}",
                row.label,
                row.closed.rate(),
                percentiles(&row.closed.latency_us),
                row.open.rate(),
                percentiles(&row.open.latency_us),
                row.rss_mib,
                row.cpu_per_10k
            );
            for (rate, phase) in &row.fixed {
                println!(
                    "{:<36} open loop offered {:>6.0}/s: delivered {:>8.0}/s, p50/p90/p99/p99.9 ms {}",
                    "",
                    rate,
                    phase.rate(),
                    percentiles(&phase.latency_us)
                );
            }
            if let Some(rss) = server
                .as_ref()
                .and_then(|s| s.pid())
                .and_then(procstat::peak_rss)
            {
                println!(
                    "{:<36} nats-server peak RSS {:.1} MiB",
                    "",
                    rss as f64 / (1024.0 * 1024.0)
                );
            }
            rows.push((matches!(target, Target::Raw { .. }), row));
            drop(service);
            drop(server);
        }
        // Each worker row against each raw forwarder (1 and 2 writes) under
        // the same setting.
        let (raws, workers): (Vec<_>, Vec<_>) = rows.iter().partition(|(raw, _)| *raw);
        for (_, row) in &workers {
            for (_, raw) in raws.iter().filter(|(_, r)| r.durability == row.durability) {
                let added = |q: f64| {
                    (row.open.latency_us.value_at_quantile(q) as f64
                        - raw.open.latency_us.value_at_quantile(q) as f64)
                        / 1000.0
                };
                println!(
                    "{:<36} vs {}: throughput ratio {:.2}; added latency at half load p50 {:+.2} ms, p99 {:+.2} ms",
                    row.label,
                    raw.label,
                    row.closed.rate() / raw.closed.rate(),
                    added(0.5),
                    added(0.99)
                );
                for ((rate, phase), (_, raw_phase)) in row.fixed.iter().zip(&raw.fixed) {
                    let added = |q: f64| {
                        (phase.latency_us.value_at_quantile(q) as f64
                            - raw_phase.latency_us.value_at_quantile(q) as f64)
                            / 1000.0
                    };
                    println!(
                        "{:<36} vs {} at {rate:.0}/s offered: added latency p50 {:+.2} ms, p99 {:+.2} ms",
                        row.label,
                        raw.label,
                        added(0.5),
                        added(0.99)
                    );
                }
            }
        }
        // What fsyncing every write costs each target: `always` against
        // `interval`, throughput and latency.
        use broker_config::server::Durability;
        let under = |label: &str, d: Durability| {
            rows.iter()
                .map(|(_, r)| r)
                .find(|r| r.durability == d && r.label == format!("{label} [{d}]"))
        };
        for target in &targets {
            let (Some(always), Some(interval)) = (
                under(target.label(), Durability::Always),
                under(target.label(), Durability::Interval),
            ) else {
                continue;
            };
            let p99 = |p: &load::PhaseResult| p.latency_us.value_at_quantile(0.99) as f64 / 1000.0;
            println!(
                "{:<36} always / interval: closed-loop throughput {:.2}; p99 at half load {:.2} / {:.2} ms",
                target.label(),
                always.closed.rate() / interval.closed.rate(),
                p99(&always.open),
                p99(&interval.open),
            );
            for ((rate, a), (_, i)) in always.fixed.iter().zip(&interval.fixed) {
                println!(
                    "{:<36} always / interval at {rate:.0}/s offered: delivered {:.0} / {:.0}/s, p50 {:.2} / {:.2} ms, p99 {:.2} / {:.2} ms (ratio {:.2})",
                    target.label(),
                    a.rate(),
                    i.rate(),
                    a.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
                    i.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
                    p99(a),
                    p99(i),
                    p99(a) / p99(i),
                );
            }
        }
    }
    Ok(())
}
