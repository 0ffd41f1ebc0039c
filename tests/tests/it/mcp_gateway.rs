//! The MCP gateway with a real MCP client: the official Python SDK (PyPI
//! `mcp`) over Streamable HTTP, against the gateway, the policy worker and
//! the audit sink on a broker with authorization, and a Rust SDK agent
//! serving the tools. The client acts as agent `planner` with the bearer
//! token of the token file; the shipped policies let it call low-risk tools
//! (`code.search`) and forbid `shell.exec`.

use agents_sdk::{Agent, ToolCall, ToolSpec};
use anyhow::Context as _;
use e2e::WAIT;
use serde_json::{Value, json};
use testkit::eventually;

use crate::mcp_support::{Stack, serve};

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
