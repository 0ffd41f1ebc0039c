//! MCP figures: a `tools/call` round trip through the MCP gateway, the
//! policy worker and a Rust SDK tool agent, beside the same call made
//! natively with the SDK (`Workflow::call_tool`), at 1 and 10 concurrent
//! clients. The two sides alternate in rounds within one run, so a noisy
//! machine hits both alike. Prints figures; never fails on timing.
//!
//! The MCP client is a minimal Streamable HTTP client on hyper (one HTTP/1.1
//! connection and one MCP session per client: `initialize`,
//! `notifications/initialized`, then `tools/call`s), so what is timed is the
//! gateway, not a client library.

use std::time::{Duration, Instant};

use agents_sdk::{Agent, ToolCall, ToolSpec};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Options of `mesh-bench mcp`.
#[derive(Debug, clap::Args)]
pub(crate) struct McpArgs {
    /// Calls per side and round at each concurrency.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Rounds; each round times the native side and the MCP side in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent clients to time (each its own MCP session, or its own SDK workflow).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    concurrency: Vec<usize>,
    /// The shipped policy directory (the calls go through the worker).
    #[arg(long, default_value = "policies")]
    policies: std::path::PathBuf,
}

/// One MCP client: a connection and a session.
struct McpClient {
    send: SendRequest<Full<Bytes>>,
    host: String,
    session: Option<String>,
    next_id: u64,
}

impl McpClient {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut client = Self {
            send,
            host: addr.to_string(),
            session: None,
            next_id: 0,
        };
        let init = client
            .request(
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "mesh-bench", "version": "0"}}),
            )
            .await?;
        anyhow::ensure!(init.get("result").is_some(), "initialize failed: {init}");
        client
            .post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        Ok(client)
    }

    /// POSTs one JSON-RPC message; returns the JSON-RPC response in the
    /// body (JSON, or the first `data:` of an event stream), if any.
    async fn post(&mut self, message: Value) -> anyhow::Result<Option<Value>> {
        let mut request = Request::post(crate_path())
            .header("host", &self.host)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25");
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        let request = request.body(Full::new(Bytes::from(message.to_string())))?;
        self.send.ready().await?;
        let response = self.send.send_request(request).await?;
        if let Some(session) = response.headers().get("mcp-session-id") {
            self.session = Some(session.to_str()?.to_owned());
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let text = std::str::from_utf8(&body)?;
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            return Ok(Some(value));
        }
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("id").is_some()))
    }

    async fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.post(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no response to `{method}`"))
    }

    /// One `tools/call` of `code.search`; its round trip.
    async fn call(&mut self, i: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let response = self
            .request(
                "tools/call",
                json!({"name": "code.search", "arguments": {"q": i}}),
            )
            .await?;
        let took = started.elapsed();
        anyhow::ensure!(
            response["result"]["isError"] == false,
            "tools/call failed: {response}"
        );
        Ok(took)
    }
}

fn crate_path() -> &'static str {
    mcp_gateway::MCP_PATH
}

fn summary(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50 {:.3} ms, p99 {:.3} ms (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        h.len()
    )
}

/// `calls` native calls by `concurrency` workflows of `caller`.
async fn native(
    caller: &Agent,
    calls: usize,
    concurrency: usize,
    into: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    let mut running = FuturesUnordered::new();
    for c in 0..concurrency {
        let wf = caller.workflow();
        let share = calls / concurrency + usize::from(c < calls % concurrency);
        running.push(async move {
            let mut took = Vec::with_capacity(share);
            for i in 0..share {
                let started = Instant::now();
                wf.call_tool("code.search", json!({"q": i}))
                    .on("coder")
                    .timeout(Duration::from_secs(10))
                    .await?;
                took.push(started.elapsed());
            }
            anyhow::Ok(took)
        });
    }
    while let Some(took) = running.next().await {
        for t in took? {
            into.record(t.as_micros() as u64)?;
        }
    }
    Ok(())
}

/// `calls` MCP calls by `clients`.
async fn mcp(
    clients: &mut [McpClient],
    calls: usize,
    into: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    let n = clients.len();
    let mut running = FuturesUnordered::new();
    for (c, client) in clients.iter_mut().enumerate() {
        let share = calls / n + usize::from(c < calls % n);
        running.push(async move {
            let mut took = Vec::with_capacity(share);
            for i in 0..share {
                took.push(client.call(i).await?);
            }
            anyhow::Ok(took)
        });
    }
    while let Some(took) = running.next().await {
        for t in took? {
            into.record(t.as_micros() as u64)?;
        }
    }
    Ok(())
}

/// `mesh-bench mcp`.
pub(crate) async fn run(args: McpArgs) -> anyhow::Result<()> {
    let nats = testkit::NatsServer::start().await?;
    let url = nats.url();
    let js = async_nats::jetstream::new(nats.connect().await?);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let dir = tempfile::tempdir()?;

    let ready_file = dir.path().join("worker.ready");
    let config = policy_worker::Config {
        nats: broker_config::NatsArgs::url(url.clone()),
        policies: args.policies.clone(),
        watch_policies: false,
        ready_file: Some(ready_file.clone()),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(policy_worker::run(config, stop.clone()));
    while !ready_file.exists() {
        anyhow::ensure!(!worker.is_finished(), "the policy worker stopped at start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let coder = Agent::builder("coder")
        .max_concurrent_tools(64)
        .tool(ToolSpec::new("code.search"), |call: ToolCall| async move {
            Ok(call.arguments().clone())
        })
        .connect(&url)
        .await?;
    let serving = tokio::spawn({
        let stop = stop.clone();
        async move { coder.serve(stop.cancelled_owned()).await }
    });
    // Two callers, so that the gateway's connection (as `planner`) and the
    // native one (`reviewer`) do not share a delivery consumer.
    let native_caller = Agent::connect("reviewer", &url).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gateway_config = mcp_gateway::Config {
        nats_url: url.clone(),
        listen: "127.0.0.1:0".parse()?,
        policies: args.policies.clone(),
        insecure: true,
        insecure_agent: "planner".into(),
        tokens_file: dir.path().join("none.json"),
        agent_keys_dir: dir.path().join("keys"),
        ..Default::default()
    };
    let gateway = tokio::spawn(mcp_gateway::run_with(gateway_config, stop.clone(), |r| {
        let _ = tx.send(r.addr);
    }));
    let addr = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| anyhow::anyhow!("the gateway did not start"))?
        .map_err(|_| anyhow::anyhow!("the gateway stopped at start"))?;

    println!(
        "tools/call round trip, code.search on a Rust SDK agent through the policy worker; \
         {} calls per side per round, {} rounds, sides alternating",
        args.calls, args.rounds
    );
    for &concurrency in &args.concurrency {
        let mut clients = Vec::new();
        for _ in 0..concurrency {
            clients.push(McpClient::connect(addr).await?);
        }
        // Warm-up: connections, consumers, caches.
        native(&native_caller, 20, concurrency, &mut Histogram::new(3)?).await?;
        mcp(&mut clients, 20, &mut Histogram::new(3)?).await?;
        let mut sdk = Histogram::<u64>::new(3)?;
        let mut gw = Histogram::<u64>::new(3)?;
        for _ in 0..args.rounds {
            native(&native_caller, args.calls, concurrency, &mut sdk).await?;
            mcp(&mut clients, args.calls, &mut gw).await?;
        }
        let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1000.0;
        println!("  {concurrency} concurrent: native SDK {}", summary(&sdk));
        println!("  {concurrency} concurrent: MCP gateway {}", summary(&gw));
        println!(
            "  {concurrency} concurrent: the gateway adds {:.3} ms at p50",
            p50(&gw) - p50(&sdk)
        );
    }
    stop.cancel();
    let _ = serving.await;
    let _ = worker.await;
    let _ = gateway.await;
    Ok(())
}
