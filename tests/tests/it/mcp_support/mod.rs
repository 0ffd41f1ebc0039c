//! Shared by the MCP tests (`mcp_gateway`, `fastmcp_bridged`): the gateway
//! stack with the official Python `mcp` client (`mcp_client.py`), the
//! FastMCP server of `tests/mcp/tools_server.py`, the policies that let
//! `planner` call its tools, and the bridge run in-process.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use agents_sdk::{Agent, Directory, ToolCall, ToolSpec};
use anyhow::Context as _;
use broker_config::mcp_tokens::{TokenFile, new_token};
use e2e::{SecureNats, WAIT};
use serde_json::{Value, json};
use testkit::{ClickHouseServer, eventually};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio_util::sync::CancellationToken;

use crate::python_support::{python, require};

/// The agents of the stack's broker: `tools` is the bridge's.
pub(crate) const AGENTS: &[&str] = &["planner", "coder", "reviewer", "tools"];

/// Serves `agent`'s tools until the returned token is cancelled.
pub(crate) fn serve(agent: Agent) -> CancellationToken {
    let stop = CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(async move { agent.serve(until.cancelled_owned()).await });
    stop
}

/// Everything one test runs, stopped when dropped.
pub(crate) struct Stack {
    pub(crate) mesh: SecureNats,
    clickhouse: ClickHouseServer,
    database: String,
    pub(crate) url: String,
    token: String,
    stops: Vec<CancellationToken>,
    _dir: tempfile::TempDir,
    _policies: Option<tempfile::TempDir>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.cancel();
        }
    }
}

impl Stack {
    /// The stack on the shipped policies, the gateway waiting
    /// `call_timeout_ms` for a result.
    pub(crate) async fn start(call_timeout_ms: u64) -> anyhow::Result<Self> {
        Self::start_on(call_timeout_ms, None).await
    }

    /// [`Stack::start`], the worker and the gateway on `policies` (the
    /// shipped ones when `None`).
    pub(crate) async fn start_on(
        call_timeout_ms: u64,
        policies: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        require("mcp")?;
        let mesh = SecureNats::start(AGENTS).await?;
        let dir = tempfile::tempdir()?;
        let clickhouse = ClickHouseServer::start().await?;
        let database = clickhouse.unique_database("mcp");
        let policy_dir = policies
            .as_ref()
            .map_or_else(testkit::shipped_policies, |p| p.path().to_owned());
        let mut stops = vec![e2e::start_worker_on(&mesh, policy_dir.clone()).await?];

        let ready = dir.path().join("sink.ready");
        let mut sink = audit_sink::Config::new(mesh.url(), clickhouse.url());
        sink.nats.credentials.nkey_seed_file =
            Some(mesh.seed_file(broker_config::auth::AUDIT_SINK)?);
        sink.database = database.clone();
        sink.batch_period_ms = 100;
        sink.ready_file = Some(ready.clone());
        let stop = CancellationToken::new();
        let mut handle = tokio::spawn(audit_sink::run(sink, stop.clone()));
        e2e::until_started(&ready, &mut handle, "the audit sink").await?;
        stops.push(stop);

        // The tool agent: a Rust SDK agent with the tools' schemas on its card.
        let tools = Agent::builder("coder")
            .tool(
                ToolSpec::new("code.search")
                    .description("Search the code base")
                    .input_schema(json!({
                        "type": "object",
                        "properties": {"query": {"type": "string"}},
                        "required": ["query"]
                    })),
                |call: ToolCall| async move {
                    let query: String = call.arg("query")?;
                    Ok(json!({"matches": [query]}))
                },
            )
            .tool(ToolSpec::new("shell.exec"), |_call: ToolCall| async move {
                Ok(json!("never runs: the policies forbid it"))
            })
            .tool(ToolSpec::new("repo.write"), |_call: ToolCall| async move {
                Ok(json!("workers only"))
            })
            .nkey(mesh.seed("coder")?)
            .connect(mesh.url())
            .await?;
        stops.push(serve(tools));

        // The client's token, as `meshctl agents mcp-token planner` issues it.
        let token = new_token();
        let tokens_file = dir.path().join("mcp-tokens.json");
        let mut tokens = TokenFile::default();
        tokens.set("planner", &token);
        tokens.write(&tokens_file)?;
        let keys: PathBuf = mesh
            .seed_file("planner")?
            .parent()
            .context("seed file without a directory")?
            .to_owned();
        let config = mcp_gateway::Config {
            nats_url: mesh.url(),
            listen: "127.0.0.1:0".parse()?,
            tokens_file,
            agent_keys_dir: keys,
            policies: policy_dir,
            call_timeout_ms,
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gateway = tokio::spawn(mcp_gateway::run_with(config, stop.clone(), move |r| {
            let _ = tx.send(r.addr);
        }));
        let addr = tokio::time::timeout(WAIT, rx)
            .await
            .context("the gateway did not start")?
            .map_err(|_| anyhow::anyhow!("the gateway stopped at start: {:?}", gateway))?;
        stops.push(stop);
        Ok(Self {
            url: format!("http://{addr}{}", mcp_gateway::MCP_PATH),
            mesh,
            clickhouse,
            database,
            token,
            stops,
            _dir: dir,
            _policies: policies,
        })
    }

    /// Runs the client script's `scenario`; calls `on_step` with each step
    /// as it is printed; returns every step by name.
    pub(crate) async fn client(
        &self,
        scenario: &str,
        mut on_step: impl AsyncFnMut(&Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<std::collections::HashMap<String, Value>> {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/it/mcp_support/mcp_client.py");
        let mut child = tokio::process::Command::new(python())
            .arg(script)
            .args([scenario, &self.url])
            .env("MCP_TOKEN", &self.token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let mut steps = std::collections::HashMap::new();
        let read = async {
            while let Some(line) = lines.next_line().await? {
                let step: Value = serde_json::from_str(&line)
                    .with_context(|| format!("the client printed `{line}`"))?;
                on_step(&step).await?;
                steps.insert(step["step"].as_str().unwrap_or_default().to_owned(), step);
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(WAIT * 2, read)
            .await
            .context("the MCP client did not finish")??;
        let out = child.wait_with_output().await?;
        anyhow::ensure!(
            out.status.success(),
            "the MCP client failed after {:?}:\n{}",
            steps.keys().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(steps)
    }

    /// `SELECT … FORMAT TabSeparated` on the test's database, as lines.
    pub(crate) async fn rows(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        let sql = sql.replace("{db}", &self.database);
        Ok(self
            .clickhouse
            .query_text(&sql)
            .await?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// The FastMCP server script.
pub(crate) fn server_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/tools_server.py")
}

/// A copy of the shipped policies plus agent `tools` (a member, the
/// bridge's) and the FastMCP server's tools: all low risk but `http.echo`,
/// which is high risk; `cache_toml` as `cache.toml` when given.
pub(crate) fn bridged_policies(cache_toml: Option<&str>) -> anyhow::Result<tempfile::TempDir> {
    let dir = testkit::policies_copy()?;
    let file = dir.path().join("entities.json");
    let mut entities: Vec<Value> = serde_json::from_slice(&std::fs::read(&file)?)?;
    entities.push(json!({
        "uid": {"type": "Agent", "id": "tools"},
        "attrs": {"role": "worker", "team": "platform"},
        "parents": [{"type": "Role", "id": "member"}]
    }));
    for (tool, risk) in [
        ("add", "low"),
        ("echo", "low"),
        ("fail", "low"),
        ("crash", "low"),
        ("hang", "low"),
        ("calls", "low"),
        ("learn", "low"),
        ("shout", "low"),
        ("http.add", "low"),
        ("http.echo", "high"),
    ] {
        entities.push(
            json!({"uid": {"type": "Tool", "id": tool}, "attrs": {"risk": risk}, "parents": []}),
        );
    }
    std::fs::write(&file, serde_json::to_vec_pretty(&entities)?)?;
    if let Some(cache) = cache_toml {
        std::fs::write(dir.path().join("cache.toml"), cache)?;
    }
    Ok(dir)
}

/// Runs the bridge in-process until the returned token is cancelled, and
/// waits until its agent's card in `directory` lists `tools`.
pub(crate) async fn bridge(
    directory: &Directory,
    config: mcp_bridge::Config,
    tools: &[&str],
) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let token = CancellationToken::new();
    let agent_id = config.agent_id.clone();
    let handle = tokio::spawn({
        let token = token.clone();
        async move {
            if let Err(e) = mcp_bridge::run(config, token).await {
                panic!("mcp-bridge failed: {e}");
            }
        }
    });
    eventually(WAIT, "the bridge's card to list its tools", || async {
        if handle.is_finished() {
            return Some(Err(anyhow::anyhow!("mcp-bridge stopped at start")));
        }
        let card = directory.get(&agent_id).await.ok()??;
        tools.iter().all(|t| card.serves(t)).then_some(Ok(()))
    })
    .await??;
    Ok((token, handle))
}
