//! The MCP gateway with a real MCP client: the official Python SDK (PyPI
//! `mcp`) over Streamable HTTP, against the gateway, the policy worker and
//! the audit sink on a broker with authorization, and a Rust SDK agent
//! serving the tools. The client acts as agent `planner` with the bearer
//! token of the token file; the shipped policies let it call low-risk tools
//! (`code.search`) and forbid `shell.exec`.

use std::path::PathBuf;
use std::process::Stdio;

use agents_sdk::{Agent, ToolCall, ToolSpec};
use anyhow::Context as _;
use broker_config::mcp_tokens::{TokenFile, new_token};
use e2e::{SecureNats, WAIT};
use serde_json::{Value, json};
use testkit::{ClickHouseServer, eventually};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio_util::sync::CancellationToken;

use crate::python_support::{python, require};

/// Serves `agent`'s tools until the returned token is cancelled.
fn serve(agent: Agent) -> CancellationToken {
    let stop = CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(async move { agent.serve(until.cancelled_owned()).await });
    stop
}

/// Everything one test runs, stopped when dropped.
struct Stack {
    mesh: SecureNats,
    clickhouse: ClickHouseServer,
    database: String,
    url: String,
    token: String,
    stops: Vec<CancellationToken>,
    _dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.cancel();
        }
    }
}

impl Stack {
    /// The stack, the gateway waiting `call_timeout_ms` for a result.
    async fn start(call_timeout_ms: u64) -> anyhow::Result<Self> {
        require("mcp")?;
        let mesh = SecureNats::start(&["planner", "coder", "reviewer"]).await?;
        let dir = tempfile::tempdir()?;
        let clickhouse = ClickHouseServer::start().await?;
        let database = clickhouse.unique_database("mcp");
        let mut stops = vec![e2e::start_worker(&mesh).await?];

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
            policies: testkit::shipped_policies(),
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
        })
    }

    /// Runs the client script's `scenario`; calls `on_step` with each step
    /// as it is printed; returns every step by name.
    async fn client(
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
    async fn rows(&self, sql: &str) -> anyhow::Result<Vec<String>> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mcp_client_lists_and_calls_the_meshs_tools_under_policy() -> anyhow::Result<()> {
    let stack = Stack::start(20_000).await?;
    let mut reviewer = None;
    let steps = stack
        .client("calls", async |step: &Value| {
            if step["step"] == "waiting" {
                // A new tool appears in `mesh-agents`: the session is told.
                reviewer = Some(serve(
                    Agent::builder("reviewer")
                        .tool(ToolSpec::new("tests.run"), |_c: ToolCall| async move {
                            Ok(json!("ok"))
                        })
                        .nkey(stack.mesh.seed("reviewer")?)
                        .connect(stack.mesh.url())
                        .await?,
                ));
            }
            Ok(())
        })
        .await?;

    let init = &steps["initialize"];
    assert_eq!(init["server"], "agentmesh-mcp-gateway");
    assert_eq!(init["list_changed"], true);

    // tools/list: what Cedar lets `planner` call, with the card's schema.
    let tools = steps["list"]["tools"].as_object().context("no tools")?;
    let names: Vec<&String> = tools.keys().collect();
    assert_eq!(
        names,
        ["code.search"],
        "shell.exec (forbidden) and repo.write (workers only) are absent"
    );
    assert_eq!(tools["code.search"]["required"], json!(["query"]));

    // tools/call: the tool's result.
    let allowed = &steps["allowed"];
    assert_eq!(allowed["is_error"], false, "{allowed}");
    assert_eq!(allowed["structured"], json!({"matches": ["parser"]}));
    let trace = allowed["meta"]["trace_id"]
        .as_str()
        .context("no trace id")?
        .to_owned();

    // A deny: a tool error with the policies and the decision id.
    let denied = &steps["denied"];
    assert_eq!(denied["is_error"], true, "{denied}");
    assert_eq!(denied["meta"]["decision"], "deny");
    let reasons = denied["meta"]["reasons"].as_array().context("no reasons")?;
    assert!(reasons.iter().any(|r| r == "forbid-shell-exec"), "{denied}");
    let decision_id = denied["meta"]["decision_id"]
        .as_str()
        .context("no decision id")?;
    let text = denied["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("forbid-shell-exec") && text.contains(decision_id),
        "{text}"
    );

    // One session, one trace.
    assert_eq!(steps["allowed_again"]["is_error"], false);
    assert_eq!(steps["allowed_again"]["meta"]["trace_id"], trace.as_str());
    assert_eq!(denied["meta"]["trace_id"], trace.as_str());

    // notifications/tools/list_changed, then the new tool is listed.
    assert_eq!(
        steps["changed"]["tools"],
        json!(["code.search", "tests.run"])
    );

    // The audit: the session's calls and the tool's results, one trace.
    let want = vec![
        format!("coder\tio.agentmesh.tool.result\tcode.search\tallow\t"),
        format!("coder\tio.agentmesh.tool.result\tcode.search\tallow\t"),
        format!("planner\tio.agentmesh.tool.call\tcode.search\tallow\t"),
        format!("planner\tio.agentmesh.tool.call\tcode.search\tallow\t"),
        format!("planner\tio.agentmesh.tool.call\tshell.exec\tdeny\t{decision_id}"),
    ];
    let sql = format!(
        "SELECT agent, type, subject, decision, if(decision = 'deny', decision_id, '') \
         FROM `{{db}}`.decisions FINAL WHERE trace_id = '{trace}' \
         ORDER BY agent, type, subject, decision FORMAT TabSeparated"
    );
    let rows = eventually(WAIT, "the session's decisions in ClickHouse", || async {
        stack
            .rows(&sql)
            .await
            .ok()
            .filter(|r| r.len() >= want.len())
    })
    .await?;
    assert_eq!(rows, want);
    if let Some(reviewer) = reviewer {
        reviewer.cancel();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_the_gateway_keeps_serving() -> anyhow::Result<()> {
    let stack = Stack::start(20_000).await?;
    let steps = stack.client("bad", async |_| Ok(())).await?;

    for name in ["no_token", "wrong_token"] {
        let step = &steps[name];
        assert_eq!(step["status"], 401, "{step}");
        let message = step["body"]["error"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(message.contains("meshctl agents mcp-token"), "{step}");
        assert!(
            step["challenge"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Bearer"),
            "{step}"
        );
    }
    assert!(
        steps["wrong_token"]["challenge"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_token")
    );
    let malformed = &steps["malformed"];
    assert_eq!(malformed["status"], 400, "{malformed}");
    assert_eq!(malformed["body"]["error"]["code"], -32700, "{malformed}");
    let unknown = &steps["unknown_method"];
    assert_eq!(unknown["body"]["error"]["code"], -32601, "{unknown}");
    let big = &steps["big"];
    assert_eq!(big["outcome"], "error", "{big}");
    // The SDK raises the gateway's 413 as an MCP error with its message.
    let said = big["error"].as_str().unwrap_or_default();
    assert!(
        said.contains("MCPError") && said.contains("--max-body-bytes"),
        "{big}"
    );
    assert_eq!(steps["after"]["is_error"], false, "{}", steps["after"]);

    // Only the call that reached the mesh is in the audit, decided; nothing
    // was refused on the way in.
    let calls = eventually(WAIT, "the good call in ClickHouse", || async {
        let rows = stack
            .rows(
                "SELECT e.subject, d.decision FROM `{db}`.events AS e FINAL \
                 ANY INNER JOIN (SELECT agent, event_id, decision FROM `{db}`.decisions FINAL) AS d \
                 USING (agent, event_id) WHERE e.agent = 'planner' FORMAT TabSeparated",
            )
            .await
            .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .await?;
    assert_eq!(calls, ["code.search\tallow"]);
    let rejected = stack
        .rows("SELECT count() FROM `{db}`.rejected FORMAT TabSeparated")
        .await?;
    assert_eq!(rejected, ["0"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_the_tool_does_not_answer_in_time_is_an_error_that_says_so() -> anyhow::Result<()> {
    let stack = Stack::start(1_500).await?;
    // `tests.run` (low risk: allowed) whose agent takes longer than the
    // gateway waits.
    let slow_agent = serve(
        Agent::builder("reviewer")
            .tool(ToolSpec::new("tests.run"), |_c: ToolCall| async move {
                tokio::time::sleep(WAIT).await;
                Ok(json!("too late"))
            })
            .nkey(stack.mesh.seed("reviewer")?)
            .connect(stack.mesh.url())
            .await?,
    );
    let steps = stack.client("slow", async |_| Ok(())).await?;
    let slow = &steps["slow"];
    assert_eq!(slow["is_error"], true, "{slow}");
    let text = slow["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("timed out: `tests.run`"), "{text}");
    assert!(text.contains("policy allowed the call"), "{text}");
    assert_eq!(slow["meta"]["timed_out_ms"], 1_500);
    // The gateway still answers.
    assert_eq!(steps["after"]["is_error"], false, "{}", steps["after"]);
    slow_agent.cancel();
    Ok(())
}
