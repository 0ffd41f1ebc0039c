//! Measures tool calls through the mesh: `coder` serves an echoing
//! `code.search`, `planner` calls it, sequentially and concurrently, and the
//! round trips (publish, policy decision, routing, handler, result, policy
//! decision, routing) are timed.
//!
//! Run the local stack, then
//! `cargo run --release -p agents-sdk --example call_latency -- [CALLS] [CONCURRENCY]`
//! (with authorization on, add `--nkey-dir .agentmesh/auth/agents`: the
//! coder's and the planner's keys).

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use agents_sdk::{Agent, ToolCall, ToolSpec};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod common;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = common::Options::parse(&["coder", "planner"])?;
    let url = options.url();
    let mut args = options.args.iter();
    let calls: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);

    let coder = Agent::builder("coder")
        .tool(ToolSpec::new("code.search"), |call: ToolCall| async move {
            Ok(call.arguments().clone())
        });
    let coder = options.keyed(coder, "coder").connect(url).await?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn({
        let (coder, stop) = (coder.clone(), stop.clone());
        async move { coder.serve(stop.cancelled_owned()).await }
    });
    let planner = options
        .keyed(Agent::builder("planner"), "planner")
        .connect(url)
        .await?;
    let wf = planner.workflow();
    // Warm up: starts the planner's inbox and the coder's pull.
    wf.call_tool("code.search", json!({"warm": true}))
        .on("coder")
        .await?;

    let mut latencies = Vec::with_capacity(calls);
    let started = Instant::now();
    for i in 0..calls {
        let t = Instant::now();
        wf.call_tool("code.search", json!({"i": i}))
            .on("coder")
            .await?;
        latencies.push(t.elapsed());
    }
    let sequential = started.elapsed();
    latencies.sort();
    println!(
        "sequential: {calls} calls in {sequential:.2?} = {:.0} calls/s; p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        calls as f64 / sequential.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );

    let started = Instant::now();
    let mut done = 0;
    while done < calls {
        let batch = concurrency.min(calls - done);
        let results = futures::future::join_all((0..batch).map(|i| {
            wf.call_tool("code.search", json!({"i": done + i}))
                .on("coder")
                .into_future()
        }))
        .await;
        for result in results {
            result?;
        }
        done += batch;
    }
    let concurrent = started.elapsed();
    println!(
        "concurrent ({concurrency} at a time): {calls} calls in {concurrent:.2?} = {:.0} calls/s",
        calls as f64 / concurrent.as_secs_f64()
    );

    stop.cancel();
    serving.await??;
    Ok(())
}
