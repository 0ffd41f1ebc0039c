//! `mesh-bench drain`: how fast each target empties a preloaded backlog.
//!
//! The backlog is `--events` binary-mode CloudEvents of `--size` bytes with
//! nine `ce-*` headers, stored in `MESH_INGRESS` before the target starts.
//! The targets:
//!
//! - `raw1`: the raw forwarder, one stored write per event (the delivery);
//! - `raw2`: the raw forwarder that also stores a ~300 B JSON receipt, the
//!   two writes per event the mesh contract asks for (its floor);
//! - `worker`: the policy worker, audit sink paused (not running);
//! - `mesh`: the policy worker with the audit sink running, as users run
//!   it; drained once the worker acked every event and the sink acked (so
//!   inserted) both rows of every event.
//!
//! With `--durability always,interval` every run drains every target once
//! under each setting (`jetstream { sync_interval: always }`, each write
//! fsynced before its acknowledgement, against nats-server's own 2-minute
//! flush), the two settings alternating in order from run to run, and the
//! summary gives each target's interval/always ratio within each run.
//!
//! Every drain runs on a fresh private nats-server (nothing an earlier
//! target stored, no heap it grew: nats-server's garbage-collector pauses
//! grow with its heap) and starts from empty streams with no consumer on
//! them (the tool checks, and says so, before it preloads). Every run runs
//! each target once, in an order that rotates from run to run, and the
//! summary gives medians and the spread. CPU is per process over the drain: the target, nats-server,
//! the audit sink and ClickHouse, in µs per event. Never fails on timing.
//!
//! `--method outside` (module `outside`) measures the same targets as issue
//! 34 did from outside: one nats-server for the whole sitting, each target
//! stopped (SIGSTOP) while its backlog is preloaded, then resumed, and timed
//! by JetStream's timestamps from the first to the last delivery stored;
//! `--method fresh,outside` runs both and prints them side by side.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use broker_config::server::Durability;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use schemas::subjects;

use crate::{Service, forwarder, generate_policies, procstat, sibling};

mod outside;

/// Options of `mesh-bench drain`.
#[derive(Debug, clap::Args)]
pub(crate) struct DrainArgs {
    /// Events in each backlog.
    #[arg(long, default_value_t = 40_000)]
    events: u64,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Runs of every target (each in a rotated order).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Targets, in the first run's order: raw1, raw2, worker, mesh.
    #[arg(long, value_delimiter = ',', default_value = "raw1,raw2,worker,mesh")]
    targets: Vec<Kind>,
    /// The policy directory the worker loads.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// Generated policies added to that set (`policy_worker::generated_policies`).
    #[arg(long, default_value_t = 0)]
    generated: usize,
    /// Workflows (trace ids) the events are spread over, round robin; 1:
    /// every event in one workflow. Matters to workflow labels
    /// (`flows.toml`), which are kept per workflow.
    #[arg(long, default_value_t = 1)]
    workflows: u64,
    /// Pin the target process (forwarder or worker) to these CPUs with
    /// `taskset -c`, e.g. `0` or `0,1`; nats-server and the sink are not pinned.
    #[arg(long)]
    cpus: Option<String>,
    /// The nats-server's durability for the drains: `always` (every write
    /// fsynced before it is acknowledged, the stack's default), `interval`
    /// (nats-server's 2-minute flush), or both (`always,interval`: every
    /// run drains each target under both, alternating which goes first).
    #[arg(long, value_delimiter = ',', default_value = "always")]
    durability: Vec<Durability>,
    /// How each drain is set up and timed: `fresh` (a fresh nats-server per
    /// drain, the target started on the preloaded backlog, timed from its
    /// start until its consumer has nothing pending or unacked) and/or
    /// `outside` (one nats-server for the sitting, the target stopped with
    /// SIGSTOP during the preload and resumed, timed from the first to the
    /// last delivery stored; the mesh until every decision row is
    /// queryable).
    #[arg(long, value_delimiter = ',', default_value = "fresh")]
    method: Vec<Method>,
}

/// How a drain is set up and timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Method {
    Fresh,
    Outside,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Self::Fresh => {
                "fresh nats-server per drain, from the target's start until its consumer is drained"
            }
            Self::Outside => {
                "outside: one nats-server per setting, target SIGSTOPped while preloaded, first → last delivery stored (mesh: resume → every decision row queryable)"
            }
        }
    }
}

/// The `sync_interval` the bench's nats-server runs with.
pub(crate) fn sync_interval(durability: Durability) -> String {
    // `interval` is nats-server's own default, said explicitly: the test
    // harness would otherwise start its servers with `always`.
    durability.sync_interval().unwrap_or("2m").to_owned()
}

/// A drain target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    Raw1,
    Raw2,
    Worker,
    Mesh,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Raw1 => "raw forwarder, 1 write",
            Self::Raw2 => "raw forwarder, 2 writes",
            Self::Worker => "policy worker, sink paused",
            Self::Mesh => "worker + audit sink",
        }
    }
    fn consumer(self) -> &'static str {
        match self {
            Self::Raw1 | Self::Raw2 => forwarder::CONSUMER,
            Self::Worker | Self::Mesh => "policy-worker",
        }
    }
}

/// What one drain measured.
#[derive(Debug, Clone, Copy)]
struct Drain {
    kind: Kind,
    durability: Durability,
    seconds: f64,
    /// Seconds until the target itself had acked everything (for `mesh`,
    /// before the sink finished).
    target_seconds: f64,
    target_cpu_us: f64,
    /// The part of `target_cpu_us` spent in the kernel.
    target_sys_us: f64,
    nats_cpu_us: f64,
    sink_cpu_us: f64,
    clickhouse_cpu_us: f64,
    rss_mib: f64,
    /// nats-server's peak RSS (a fresh server per drain).
    nats_rss_mib: f64,
}

impl Drain {
    fn rate(&self, events: u64) -> f64 {
        events as f64 / self.seconds
    }
}

/// One preloaded event: nine `ce-*` headers and `Nats-Msg-Id`.
fn event(run: &str, i: u64, size: usize, workflows: u64) -> (HeaderMap, bytes::Bytes) {
    let id = format!("{run}-{i}");
    let mut headers = crate::load::handoff_headers();
    if workflows > 1 {
        let trace = format!("00-{:032x}-00f067aa0ba902b7-01", i % workflows + 1);
        headers.insert("ce-traceparent", trace.as_str());
    }
    headers.insert("ce-id", id.as_str());
    headers.insert("Nats-Msg-Id", format!("planner/{id}").as_str());
    let head = "{\"task\":\"";
    let pad = "x".repeat(size.saturating_sub(head.len() + 2));
    (headers, format!("{head}{pad}\"}}").into())
}

pub(crate) async fn preload(
    js: &jetstream::Context,
    run: &str,
    n: u64,
    size: usize,
    workflows: u64,
) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        if pending.len() >= 2048
            && let Some(ack) = pending.next().await
        {
            ack?;
        }
        let (headers, payload) = event(run, i, size, workflows);
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

const STREAMS: [&str; 4] = [
    subjects::STREAM_INGRESS,
    subjects::STREAM_DELIVER,
    subjects::STREAM_DECISION,
    subjects::STREAM_DEAD,
];

/// Empties the streams and removes every consumer on them.
pub(crate) async fn reset(js: &jetstream::Context) -> anyhow::Result<()> {
    for name in STREAMS {
        let stream = js.get_stream(name).await?;
        let consumers: Vec<String> = stream
            .consumer_names()
            .filter_map(|n| async move { n.ok() })
            .collect()
            .await;
        for consumer in consumers {
            stream.delete_consumer(&consumer).await?;
        }
        stream.purge().await?;
    }
    Ok(())
}

/// The consumers on the streams (there must be none before a target starts).
async fn consumers(js: &jetstream::Context) -> anyhow::Result<Vec<String>> {
    let mut all = Vec::new();
    for name in STREAMS {
        let stream = js.get_stream(name).await?;
        let names: Vec<String> = stream
            .consumer_names()
            .filter_map(|n| async move { n.ok() })
            .collect()
            .await;
        all.extend(names.into_iter().map(|n| format!("{name}/{n}")));
    }
    Ok(all)
}

pub(crate) async fn messages(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js
        .get_stream(stream)
        .await?
        .get_info()
        .await?
        .state
        .messages)
}

/// Whether `consumer` on `stream` has nothing left to deliver or to be acked.
pub(crate) async fn drained(js: &jetstream::Context, stream: &str, consumer: &str) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return false;
    };
    match stream.consumer_info(consumer).await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
        Err(_) => false,
    }
}

pub(crate) fn cpu(pid: Option<u32>) -> f64 {
    pid.and_then(procstat::cpu_seconds).unwrap_or(0.0)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

pub(crate) fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

struct Bench {
    args: DrainArgs,
    clickhouse: Option<testkit::ClickHouseServer>,
    policies: PathBuf,
    me: PathBuf,
}

/// The broker of one drain: a fresh nats-server with the mesh's streams.
struct Broker {
    nats: testkit::NatsServer,
    js: jetstream::Context,
}

impl Broker {
    async fn start(durability: Durability) -> anyhow::Result<Self> {
        let nats = testkit::NatsServer::start_with(testkit::Store {
            sync_interval: Some(sync_interval(durability)),
            ..Default::default()
        })
        .await?;
        let mut js = jetstream::new(nats.connect().await?);
        // The preload keeps 2,048 publishes open: with every write fsynced
        // on a busy disk their acks take longer than the default 5 s.
        js.set_timeout(crate::ACK_TIMEOUT);
        broker_config::apply(&js, &broker_config::Options::default()).await?;
        Ok(Self { nats, js })
    }
}

impl Bench {
    fn command(&self, program: PathBuf) -> Command {
        match &self.args.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    async fn target(&self, kind: Kind, url: &str) -> anyhow::Result<Service> {
        let cmd = match kind {
            Kind::Raw1 | Kind::Raw2 => {
                let mut c = self.command(self.me.clone());
                c.args(["forward", "--nats-url", url]);
                if kind == Kind::Raw2 {
                    c.arg("--receipt");
                }
                c
            }
            Kind::Worker | Kind::Mesh => {
                let mut c = self.command(sibling(&self.me, "policy-worker")?);
                c.args(["--nats-url", url, "--no-watch", "--policies"])
                    .arg(&self.policies);
                c
            }
        };
        Service::spawn(kind.label(), cmd).await
    }

    async fn sink(&self, database: &str, url: &str) -> anyhow::Result<Service> {
        let clickhouse = self
            .clickhouse
            .as_ref()
            .context("the mesh target needs ClickHouse")?;
        let mut c = Command::new(sibling(&self.me, "audit-sink")?);
        c.args([
            "--nats-url",
            url,
            "--clickhouse-url",
            &clickhouse.url(),
            "--database",
            database,
        ]);
        Service::spawn("audit-sink", c).await
    }

    async fn drain(&self, run: usize, kind: Kind, durability: Durability) -> anyhow::Result<Drain> {
        let broker = Broker::start(durability).await?;
        let js = &broker.js;
        let url = broker.nats.url();
        let n = self.args.events;
        reset(js).await?;
        let left = consumers(js).await?;
        if !left.is_empty() {
            bail!("consumers left over from an earlier target: {left:?}");
        }
        let tag = format!("r{run}{}", uuid::Uuid::now_v7().simple());
        preload(js, &tag, n, self.args.size, self.args.workflows).await?;
        let stored = messages(js, subjects::STREAM_INGRESS).await?;
        if stored != n {
            bail!("preloaded {stored} events instead of {n}");
        }
        let database = format!("bench_{tag}");
        let sink = match kind {
            Kind::Mesh => Some(self.sink(&database, &url).await?),
            _ => None,
        };
        let target = self.target(kind, &url).await?;
        let nats_pid = broker.nats.pid();
        let ch_pid = self.clickhouse.as_ref().and_then(|c| c.pid());
        let sink_pid = sink.as_ref().map(Service::pid);
        let sys_before = procstat::cpu_split(target.pid()).map_or(0.0, |(_, s)| s);
        let before = (
            cpu(Some(target.pid())),
            cpu(nats_pid),
            cpu(sink_pid),
            cpu(ch_pid),
        );
        let started = Instant::now();
        let deadline = started + Duration::from_secs(600);
        let mut target_seconds = None;
        loop {
            if target_seconds.is_none()
                && drained(js, subjects::STREAM_INGRESS, kind.consumer()).await
            {
                target_seconds = Some(started.elapsed().as_secs_f64());
            }
            if let Some(done) = target_seconds {
                let sink_done = match kind {
                    Kind::Mesh => {
                        drained(js, subjects::STREAM_INGRESS, "audit-sink-events").await
                            && drained(js, subjects::STREAM_DECISION, "audit-sink-decisions").await
                    }
                    _ => true,
                };
                if sink_done {
                    let seconds = if kind == Kind::Mesh {
                        started.elapsed().as_secs_f64()
                    } else {
                        done
                    };
                    let elapsed = |after: f64, before: f64| (after - before) * 1e6 / n as f64;
                    let result = Drain {
                        kind,
                        durability,
                        seconds,
                        target_seconds: done,
                        target_cpu_us: elapsed(cpu(Some(target.pid())), before.0),
                        target_sys_us: elapsed(
                            procstat::cpu_split(target.pid()).map_or(0.0, |(_, s)| s),
                            sys_before,
                        ),
                        nats_cpu_us: elapsed(cpu(nats_pid), before.1),
                        sink_cpu_us: elapsed(cpu(sink_pid), before.2),
                        clickhouse_cpu_us: if kind == Kind::Mesh {
                            elapsed(cpu(ch_pid), before.3)
                        } else {
                            0.0
                        },
                        rss_mib: procstat::peak_rss(target.pid()).unwrap_or(0) as f64 / 1048576.0,
                        nats_rss_mib: nats_pid.and_then(procstat::peak_rss).unwrap_or(0) as f64
                            / 1048576.0,
                    };
                    self.check(js, kind, n, &database).await?;
                    drop(target);
                    drop(sink);
                    if let Some(ch) = &self.clickhouse
                        && kind == Kind::Mesh
                    {
                        let _ = ch
                            .query_text(&format!("DROP DATABASE IF EXISTS {database}"))
                            .await;
                    }
                    return Ok(result);
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not drain {n} events within 600 s", kind.label());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What arrived: every event delivered (and receipted) once.
    async fn check(
        &self,
        js: &jetstream::Context,
        kind: Kind,
        n: u64,
        database: &str,
    ) -> anyhow::Result<()> {
        let delivered = messages(js, subjects::STREAM_DELIVER).await?;
        let receipts = messages(js, subjects::STREAM_DECISION).await?;
        let want_receipts = if kind == Kind::Raw1 { 0 } else { n };
        if delivered != n || receipts != want_receipts {
            bail!(
                "{}: {delivered} deliveries and {receipts} receipts for {n} events",
                kind.label()
            );
        }
        if kind == Kind::Mesh
            && let Some(ch) = &self.clickhouse
        {
            let count = |table: &str| {
                let sql = format!("SELECT count() FROM {database}.{table} FINAL");
                async move {
                    ch.query_text(&sql)
                        .await
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                }
            };
            let (events, decisions) = (count("events").await, count("decisions").await);
            if events != n || decisions != n {
                bail!(
                    "audit sink: {events} event rows and {decisions} decision rows for {n} events"
                );
            }
            println!("     at rest: {}", self.storage(js, database).await?);
        }
        Ok(())
    }

    /// What one event takes at rest after a mesh run: its rows in
    /// ClickHouse once merged (`OPTIMIZE … FINAL`; compressed and raw bytes
    /// per row as `system.parts` counts them) and its messages in the
    /// streams (bytes per message, JetStream's own count).
    async fn storage(&self, js: &jetstream::Context, database: &str) -> anyhow::Result<String> {
        let mut parts = Vec::new();
        if let Some(ch) = &self.clickhouse {
            for table in ["events", "decisions"] {
                ch.query_text(&format!("OPTIMIZE TABLE {database}.{table} FINAL"))
                    .await?;
                let sql = format!(
                    "SELECT sum(rows), sum(data_compressed_bytes), sum(data_uncompressed_bytes) \
                     FROM system.parts WHERE active AND database = '{database}' AND table = '{table}'"
                );
                let text = ch.query_text(&sql).await?;
                let f: Vec<f64> = text
                    .split_whitespace()
                    .map(|v| v.parse().unwrap_or(0.0))
                    .collect();
                let [rows, compressed, raw] = f[..] else {
                    bail!("system.parts for {database}.{table}: {text:?}");
                };
                parts.push(format!(
                    "{table} {:.0} B/row ({:.0} B uncompressed)",
                    compressed / rows.max(1.0),
                    raw / rows.max(1.0)
                ));
            }
        }
        for stream in [
            subjects::STREAM_INGRESS,
            subjects::STREAM_DECISION,
            subjects::STREAM_DELIVER,
        ] {
            let state = js.get_stream(stream).await?.get_info().await?.state;
            parts.push(format!(
                "{stream} {:.0} B/message",
                state.bytes as f64 / state.messages.max(1) as f64
            ));
        }
        Ok(parts.join(", "))
    }
}

pub(crate) async fn run(args: DrainArgs) -> anyhow::Result<()> {
    if args.targets.is_empty() || args.runs == 0 {
        bail!("nothing to run: give --targets and --runs");
    }
    if args.method.is_empty() {
        bail!("nothing to run: give --method fresh, outside or both");
    }
    let clickhouse = if args.targets.contains(&Kind::Mesh) {
        Some(testkit::ClickHouseServer::start().await?)
    } else {
        None
    };
    let generated = (args.generated > 0)
        .then(|| generate_policies(&args.policies, args.generated))
        .transpose()?;
    let policies = generated
        .as_ref()
        .map_or_else(|| args.policies.clone(), |d| d.path().to_owned());
    if args.durability.is_empty() {
        bail!("nothing to run: give --durability always, interval or both");
    }
    println!(
        "mesh-bench drain: {} events of {} B per backlog, {} runs, nats-server {}; sync_interval {}, policies `{}`{}{}",
        args.events,
        args.size,
        args.runs,
        crate::gc_settings(),
        args.durability
            .iter()
            .map(|d| sync_interval(*d))
            .collect::<Vec<_>>()
            .join(" and "),
        args.policies.display(),
        if args.generated > 0 {
            format!(" + {} generated", args.generated)
        } else {
            String::new()
        },
        args.cpus
            .as_ref()
            .map(|c| format!(", target pinned to CPUs {c}"))
            .unwrap_or_default()
    );
    if let Some(ch) = &clickhouse {
        println!(
            "ClickHouse {} (audit sink in the mesh runs)",
            ch.version().await.unwrap_or_default()
        );
    }
    let bench = Bench {
        me: std::env::current_exe()?,
        policies,
        args,
        clickhouse,
    };
    let mut sittings = Vec::new();
    for &method in &bench.args.method {
        println!("\n== method {}", method.label());
        println!(
            "{:<4} {:<28} {:<8} {:>10} {:>8} {:>10} {:>8} {:>10} {:>10} {:>10} {:>9}",
            "run",
            "target",
            "sync",
            "events/s",
            "secs",
            "target µs",
            "of it sys",
            "nats µs",
            "sink µs",
            "CH µs",
            "peak RSS"
        );
        let results = bench.runs(method).await?;
        sittings.push((method, results));
    }
    for (method, results) in &sittings {
        println!(
            "\n== {}: medians over {} runs (min–max)",
            method.label(),
            bench.args.runs
        );
        summarize(&bench.args, results);
    }
    if sittings.len() > 1 {
        side_by_side(&bench.args, &sittings);
    }
    Ok(())
}

impl Bench {
    /// Every run of every target under every setting, by `method`: each
    /// run in a rotated order of the targets, each target under each
    /// setting back to back, the setting that goes first alternating from
    /// run to run.
    async fn runs(&self, method: Method) -> anyhow::Result<Vec<Vec<Drain>>> {
        let n = self.args.events;
        // The outside method's servers: one per setting, for the sitting.
        let mut brokers = Vec::new();
        if method == Method::Outside {
            for &durability in &self.args.durability {
                brokers.push((durability, Broker::start(durability).await?));
            }
        }
        let mut results: Vec<Vec<Drain>> = Vec::new();
        for run in 0..self.args.runs {
            let mut order = self.args.targets.clone();
            let shift = run % order.len();
            order.rotate_left(shift);
            let mut settings = self.args.durability.clone();
            let shift = run % settings.len();
            settings.rotate_left(shift);
            let mut round = Vec::new();
            for (kind, durability) in order
                .iter()
                .flat_map(|&kind| settings.iter().map(move |&d| (kind, d)))
            {
                let d = match method {
                    Method::Fresh => self.drain(run, kind, durability).await?,
                    Method::Outside => {
                        let broker = brokers
                            .iter()
                            .find(|(d, _)| *d == durability)
                            .map(|(_, b)| b)
                            .context("no nats-server for this setting")?;
                        self.outside(broker, run, kind, durability).await?
                    }
                };
                println!(
                    "{:<4} {:<28} {:<8} {:>10.0} {:>8.2} {:>10.1} {:>8.1} {:>10.1} {:>10.1} {:>10.1} {:>5.1} MiB{}",
                    run + 1,
                    kind.label(),
                    durability.as_str(),
                    d.rate(n),
                    d.seconds,
                    d.target_cpu_us,
                    d.target_sys_us,
                    d.nats_cpu_us,
                    d.sink_cpu_us,
                    d.clickhouse_cpu_us,
                    d.rss_mib,
                    match (kind, method) {
                        (Kind::Mesh, Method::Fresh) =>
                            format!(" (worker done at {:.2} s)", d.target_seconds),
                        (Kind::Mesh, Method::Outside) =>
                            format!(" (first → last delivery {:.2} s)", d.target_seconds),
                        _ => String::new(),
                    }
                );
                round.push(d);
            }
            results.push(round);
        }
        Ok(results)
    }
}

/// Ratios within each run (same sitting), then their median: drain time
/// of `b` over drain time of `a`, i.e. a's rate over b's.
fn ratio(
    results: &[Vec<Drain>],
    a: (Kind, Durability),
    b: (Kind, Durability),
) -> Option<(f64, f64, f64)> {
    let per_run: Vec<f64> = results
        .iter()
        .filter_map(|round| {
            let x = round
                .iter()
                .find(|d| d.kind == a.0 && d.durability == a.1)?;
            let y = round
                .iter()
                .find(|d| d.kind == b.0 && d.durability == b.1)?;
            Some(y.seconds / x.seconds)
        })
        .collect();
    if per_run.is_empty() {
        return None;
    }
    let (lo, hi) = spread(&per_run);
    Some((median(per_run), lo, hi))
}

/// The ratios the summaries print: worker and mesh against the forwarders.
const RATIOS: [(Kind, Kind, &str); 4] = [
    (
        Kind::Worker,
        Kind::Raw2,
        "policy worker / 2-write forwarder",
    ),
    (
        Kind::Worker,
        Kind::Raw1,
        "policy worker / 1-write forwarder",
    ),
    (
        Kind::Mesh,
        Kind::Raw1,
        "worker + sink (end to end) / 1-write forwarder",
    ),
    (Kind::Raw2, Kind::Raw1, "2-write / 1-write forwarder"),
];

/// Medians and spreads of one method's runs, and the ratios run by run.
fn summarize(args: &DrainArgs, results: &[Vec<Drain>]) {
    let n = args.events;
    let of = |kind: Kind, durability: Durability| -> Vec<Drain> {
        results
            .iter()
            .flatten()
            .filter(|d| d.kind == kind && d.durability == durability)
            .copied()
            .collect()
    };
    for &durability in &args.durability {
        for &kind in &args.targets {
            let ds = of(kind, durability);
            let rates: Vec<f64> = ds.iter().map(|d| d.rate(n)).collect();
            let (lo, hi) = spread(&rates);
            let field = |f: fn(&Drain) -> f64| median(ds.iter().map(f).collect());
            println!(
                "{:<28} {:<8} {:>8.0} events/s ({:.0}–{:.0}); CPU µs/event: target {:.1} ({:.1} sys), nats-server {:.1}, sink {:.1}, ClickHouse {:.1}; peak RSS {:.1} MiB, nats-server {:.1} MiB",
                kind.label(),
                durability.as_str(),
                median(rates.clone()),
                lo,
                hi,
                field(|d| d.target_cpu_us),
                field(|d| d.target_sys_us),
                field(|d| d.nats_cpu_us),
                field(|d| d.sink_cpu_us),
                field(|d| d.clickhouse_cpu_us),
                field(|d| d.rss_mib),
                field(|d| d.nats_rss_mib),
            );
        }
    }
    for &durability in &args.durability {
        for (a, b, what) in RATIOS {
            if let Some((m, lo, hi)) = ratio(results, (a, durability), (b, durability)) {
                let what = format!("{what} [{durability}]");
                println!("{what:<58} {m:.2} (per run {lo:.2}–{hi:.2})");
            }
        }
    }
    // What fsyncing every write costs each target: its drain rate under
    // `always` over its rate under `interval`, run by run.
    for &kind in &args.targets {
        if let Some((m, lo, hi)) = ratio(
            results,
            (kind, Durability::Always),
            (kind, Durability::Interval),
        ) {
            let what = format!("{}: always / interval", kind.label());
            println!("{what:<58} {m:.2} (per run {lo:.2}–{hi:.2})");
        }
    }
}

/// The two methods' medians and ratios next to each other.
fn side_by_side(args: &DrainArgs, sittings: &[(Method, Vec<Vec<Drain>>)]) {
    let n = args.events;
    println!("\n== the two methods side by side (medians; ratios: median of per-run ratios)");
    let methods: Vec<&str> = sittings
        .iter()
        .map(|(m, _)| match m {
            Method::Fresh => "fresh",
            Method::Outside => "outside",
        })
        .collect();
    println!("{:<58} {:>12} {:>12}", "", methods[0], methods[1]);
    for &durability in &args.durability {
        for &kind in &args.targets {
            let rate = |results: &Vec<Vec<Drain>>| {
                median(
                    results
                        .iter()
                        .flatten()
                        .filter(|d| d.kind == kind && d.durability == durability)
                        .map(|d| d.rate(n))
                        .collect(),
                )
            };
            let what = format!("{} [{durability}], events/s", kind.label());
            println!(
                "{what:<58} {:>12.0} {:>12.0}",
                rate(&sittings[0].1),
                rate(&sittings[1].1)
            );
        }
        for (a, b, what) in RATIOS {
            let r = |results: &Vec<Vec<Drain>>| {
                ratio(results, (a, durability), (b, durability))
                    .map_or_else(|| "—".to_owned(), |(m, _, _)| format!("{m:.2}"))
            };
            let what = format!("{what} [{durability}]");
            println!(
                "{what:<58} {:>12} {:>12}",
                r(&sittings[0].1),
                r(&sittings[1].1)
            );
        }
    }
}
