//! `mesh-bench cache`: the latency of a repeated tool call through the real
//! stack — agents-sdk `call_tool` → policy worker → tool agent → policy
//! worker → caller — with `code.search` cached and uncached, and the hit
//! rate of a workflow that repeats calls. Prints figures; never fails on
//! timing.
//!
//! Each run starts a private `nats-server -js` (testkit) and the policy
//! worker in-process with a copy of the shipped policies, plus `cache.toml`
//! declaring `code.search` for the cached runs. The coder serves
//! `code.search` with the demo's arguments (`{"query", "path"}`) over a
//! small in-memory repository, like `meshctl demo`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agents_sdk::{Agent, ToolCall, ToolSpec};
use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Options of `mesh-bench cache`.
#[derive(Debug, clap::Args)]
pub(crate) struct CacheArgs {
    /// Repeated calls measured per run (after the warm-up).
    #[arg(long, default_value_t = 500)]
    calls: u64,
    /// Calls in the workflow whose hit rate is reported.
    #[arg(long, default_value_t = 300)]
    workflow_calls: u64,
    /// Distinct queries the workflow draws from.
    #[arg(long, default_value_t = 20)]
    distinct: u64,
    /// The shipped policy directory.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
}

const REPOSITORY: &[(&str, &str)] = &[
    (
        "src/api.rs",
        "pub async fn login(users: &Users, email: &str) -> Result<Session, ApiError> {\n    todo!()\n}\npub async fn signup(users: &Users, form: SignupForm) -> Result<UserId, ApiError> {\n    todo!()\n}\n",
    ),
    (
        "tests/api.rs",
        "#[tokio::test]\nasync fn signup_creates_the_account() {}\n",
    ),
];

/// The demo's `code.search`: matching lines under `path`.
fn search(call: &ToolCall) -> Result<Value, agents_sdk::ToolError> {
    let query: String = call.arg("query")?;
    let path: String = call.arg("path").unwrap_or_default();
    let matches: Vec<Value> = REPOSITORY
        .iter()
        .filter(|(file, _)| file.starts_with(&path))
        .flat_map(|(file, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| line.contains(query.as_str()))
                .map(move |(n, line)| json!({"path": file, "line": n + 1, "text": line}))
        })
        .collect();
    Ok(json!({ "matches": matches }))
}

/// One private server, worker, coder and planner.
struct Stack {
    _nats: testkit::NatsServer,
    _policies: tempfile::TempDir,
    js: async_nats::jetstream::Context,
    planner: Agent,
    served: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Stack {
    async fn start(shipped: &std::path::Path, cached: bool) -> anyhow::Result<Self> {
        let nats = testkit::NatsServer::start().await?;
        let policies = tempfile::tempdir()?;
        for entry in std::fs::read_dir(shipped).with_context(|| shipped.display().to_string())? {
            let path = entry?.path();
            if path.is_file()
                && let Some(name) = path.file_name()
            {
                std::fs::copy(&path, policies.path().join(name))?;
            }
        }
        if cached {
            std::fs::write(
                policies.path().join("cache.toml"),
                "[tools.\"code.search\"]\nttl_secs = 3600\nscope = \"shared\"\n",
            )?;
        }
        let ready = policies.path().join("worker.ready");
        let stop = CancellationToken::new();
        let config = policy_worker::Config {
            nats: broker_config::NatsArgs::url(nats.url()),
            policies: policies.path().to_owned(),
            watch_policies: false,
            ready_file: Some(ready.clone()),
            ..Default::default()
        };
        let worker = tokio::spawn(policy_worker::run(config, stop.clone()));
        testkit::eventually(Duration::from_secs(60), "the policy worker", || async {
            (ready.exists() || worker.is_finished()).then_some(())
        })
        .await?;
        anyhow::ensure!(!worker.is_finished(), "the policy worker stopped at start");

        let served = Arc::new(AtomicU64::new(0));
        let count = served.clone();
        let coder = Agent::builder("coder")
            .tool(ToolSpec::new("code.search"), move |call: ToolCall| {
                count.fetch_add(1, Ordering::Relaxed);
                async move { search(&call) }
            })
            .connect(nats.url())
            .await?;
        let serving = stop.clone();
        tokio::spawn(async move { coder.serve(serving.cancelled_owned()).await });
        let planner = Agent::builder("planner").connect(nats.url()).await?;
        let js = async_nats::jetstream::new(nats.connect().await?);
        Ok(Self {
            _nats: nats,
            _policies: policies,
            js,
            planner,
            served,
            stop,
        })
    }

    async fn call(&self, query: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let result = self
            .planner
            .workflow()
            .call_tool("code.search", json!({"query": query, "path": "src/"}))
            .on("coder")
            .timeout(Duration::from_secs(30))
            .await?;
        anyhow::ensure!(
            result.get("matches").is_some(),
            "unexpected answer {result}"
        );
        Ok(started.elapsed())
    }

    /// Receipts of tool calls by their `cache` field.
    async fn cache_counts(&self) -> anyhow::Result<(u64, u64, u64)> {
        let (mut hit, mut miss, mut other) = (0, 0, 0);
        for m in testkit::stream_messages(&self.js, schemas::subjects::STREAM_DECISION).await? {
            let receipt: schemas::DecisionReceipt = serde_json::from_slice(&m.payload)?;
            if receipt.event_type != "io.agentmesh.tool.call" {
                continue;
            }
            match receipt.cache {
                Some(schemas::CacheStatus::Hit) => hit += 1,
                Some(schemas::CacheStatus::Miss) => miss += 1,
                _ => other += 1,
            }
        }
        Ok((hit, miss, other))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Runs `mesh-bench cache`.
pub(crate) async fn run(args: CacheArgs) -> anyhow::Result<()> {
    println!(
        "repeated code.search through agents-sdk call_tool, {} calls after 20 warm-up calls",
        args.calls
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "cache", "p50 ms", "p99 ms", "max ms", "calls/s", "tool served"
    );
    for cached in [false, true] {
        let stack = Stack::start(&args.policies, cached).await?;
        for _ in 0..20 {
            stack.call("fn signup").await?;
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let started = Instant::now();
        for _ in 0..args.calls {
            let took = stack.call("fn signup").await?;
            latency.record(took.as_micros().max(1) as u64)?;
        }
        let rate = args.calls as f64 / started.elapsed().as_secs_f64();
        println!(
            "{:<10} {:>10.3} {:>10.3} {:>10.3} {:>10.0} {:>12}",
            if cached { "cached" } else { "uncached" },
            ms(&latency, 0.5),
            ms(&latency, 0.99),
            latency.max() as f64 / 1000.0,
            rate,
            stack.served.load(Ordering::Relaxed)
        );
    }

    // A workflow that repeats itself: call i asks query (i * 7) mod
    // `distinct`, so every query comes back many times, interleaved.
    let stack = Stack::start(&args.policies, true).await?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..args.workflow_calls {
        let query = format!("fn {}", (i * 7) % args.distinct.max(1));
        latency.record(stack.call(&query).await?.as_micros().max(1) as u64)?;
    }
    let (hit, miss, other) = stack.cache_counts().await?;
    let calls = hit + miss + other;
    println!(
        "workflow: {} calls over {} distinct queries: {hit} hits, {miss} misses, {other} other; hit rate {:.1}% (ideal {:.1}%); tool served {}; p50 {:.3} ms, p99 {:.3} ms",
        calls,
        args.distinct,
        100.0 * hit as f64 / calls.max(1) as f64,
        100.0 * (args.workflow_calls.saturating_sub(args.distinct)) as f64
            / args.workflow_calls.max(1) as f64,
        stack.served.load(Ordering::Relaxed),
        ms(&latency, 0.5),
        ms(&latency, 0.99)
    );
    Ok(())
}
