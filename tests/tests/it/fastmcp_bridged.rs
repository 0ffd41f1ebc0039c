//! `mcp-bridge` with a real MCP server: a FastMCP server of the official
//! Python `mcp` SDK (`tests/mcp/tools_server.py`), over stdio and over
//! Streamable HTTP, bridged into the mesh as agent `tools` and called by a
//! Rust SDK agent through the real policy worker. A server that crashes in
//! the middle of a call or never answers is a tool error; the bridge keeps
//! serving and every call has its receipt and its answer on record. And
//! the whole chain from the Python MCP client through the gateway to the
//! bridged server, with the tool cache answering a repeat.

// Test helpers outside `#[test]` fns panic to fail the test, too.
#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::mcp_support::{self, Stack, bridged_policies, server_script};
use crate::sdk_support as support;

use std::process::Command;

use agents_sdk::{Agent, CallErrorKind, Decision};
use schemas::subjects;
use serde_json::json;
use support::*;
use testkit::eventually;
use tokio_util::sync::CancellationToken;

/// Fails with how to install it unless the test Python has the `mcp` SDK.
fn require_mcp() -> String {
    let python = testkit::python();
    let probe = Command::new(&python)
        .args(["-c", "import mcp.server"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the MCP bridge tests need the Python `mcp` SDK (PyPI `mcp`): run `scripts/install-deps.sh` \
         (it installs it into `.agentmesh/venv`), or point AGENTMESH_PYTHON at such an interpreter ({})",
        match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        }
    );
    python
}

/// Runs the bridge in-process until the returned token is cancelled, and
/// waits until agent `tools`' card lists `tools`.
async fn bridge(
    mesh: &Mesh,
    config: mcp_bridge::Config,
    tools: &[&str],
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let watcher = mesh
        .agent(Agent::builder("reviewer").register_card(false))
        .await;
    mcp_support::bridge(watcher.directory(), config, tools)
        .await
        .unwrap()
}

/// The message of the tool error that calling `tool` on the bridged agent
/// gets (a panic for any other outcome, or a tool error naming another tool).
async fn tool_failure(wf: &agents_sdk::Workflow, tool: &str, args: serde_json::Value) -> String {
    let err = wf.call_tool(tool, args).on("tools").await.unwrap_err();
    match err.kind() {
        CallErrorKind::ToolFailed {
            tool: failed,
            message,
        } => {
            assert_eq!(failed, tool);
            message.clone()
        }
        other => panic!("`{tool}` did not fail as a tool: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fastmcp_server_over_stdio_is_a_mesh_tool_agent() {
    let python = require_mcp();
    let policies = bridged_policies(None).unwrap();
    let mut mesh = Mesh::start().await;
    mesh.start_worker_on(policies.path().to_owned(), None).await;
    let config = mcp_bridge::Config {
        agent_id: "tools".into(),
        stdio: vec![format!("{python} {} stdio", server_script().display())],
        call_timeout_secs: 3,
        nats_url: mesh.url(),
        ..Default::default()
    };
    let (stop, served) = bridge(
        &mesh,
        config,
        &["add", "echo", "fail", "crash", "hang", "calls"],
    )
    .await;
    let planner = mesh.agent(Agent::builder("planner")).await;

    // The card carries the server's descriptions and input schemas.
    let card = planner.directory().get("tools").await.unwrap().unwrap();
    let add = card.tools.iter().find(|t| t.name == "add").unwrap();
    assert_eq!(add.description, "Adds two integers.");
    assert_eq!(add.input_schema["properties"]["a"]["type"], "integer");
    assert_eq!(add.input_schema["required"], json!(["a", "b"]));

    let wf = planner.workflow();
    let sum = wf
        .call_tool("add", json!({"a": 2, "b": 3}))
        .on("tools")
        .await
        .unwrap();
    assert_eq!(sum, json!({"result": 5}));
    let echoed = wf
        .call_tool("echo", json!({"text": "héllo"}))
        .on("tools")
        .await
        .unwrap();
    assert_eq!(echoed, json!({"result": "héllo"}));

    // Arguments the server's schema refuses are invalid at the worker.
    let err = wf
        .call_tool("add", json!({"a": "two", "b": 3}))
        .on("tools")
        .await
        .unwrap_err();
    let receipt = err.denial().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(receipt.decision, Decision::Invalid);
    assert!(
        receipt.errors[0].contains("`add` at `/a`"),
        "{:?}",
        receipt.errors
    );

    // The tool's own error is a tool error with its message.
    let message = tool_failure(&wf, "fail", json!({"message": "disk full"})).await;
    assert!(message.contains("disk full"), "{message}");

    // A server that dies in the middle of a call: a tool error that says so...
    let message = tool_failure(&wf, "crash", json!({})).await;
    assert!(message.contains("went away"), "{message}");
    // ...and the next call starts it again.
    let sum = wf
        .call_tool("add", json!({"a": 1, "b": 1}))
        .on("tools")
        .await
        .unwrap();
    assert_eq!(sum, json!({"result": 2}));
    let answered = wf.call_tool("calls", json!({})).on("tools").await.unwrap();
    assert_eq!(answered, json!({"result": 1}), "a fresh process answered");

    // A call that never ends: a timeout that says so, and the server keeps
    // answering the next.
    let message = tool_failure(&wf, "hang", json!({})).await;
    assert!(message.contains("did not answer"), "{message}");
    assert!(message.contains("3s"), "{message}");
    let sum = wf
        .call_tool("add", json!({"a": 20, "b": 22}))
        .on("tools")
        .await
        .unwrap();
    assert_eq!(sum, json!({"result": 42}));

    // Nothing lost: every call has its receipt, and every allowed one its
    // answer from the bridge, in the audit's streams.
    let calls = mesh
        .messages_on(subjects::STREAM_INGRESS, "mesh.ingress.planner.tool_call")
        .await
        .unwrap();
    assert_eq!(calls.len(), 9);
    let answers = mesh
        .messages_on(subjects::STREAM_INGRESS, "mesh.ingress.tools.tool_result")
        .await
        .unwrap();
    let answered: Vec<String> = answers
        .iter()
        .map(|m| header(m, "ce-causationid").unwrap())
        .collect();
    for call in &calls {
        let id = header(call, "ce-id").unwrap();
        let receipt = mesh.receipt(&id).await.unwrap();
        match receipt.decision {
            Decision::Allow => assert!(answered.contains(&id), "no answer to {id}"),
            Decision::Invalid => assert!(!answered.contains(&id)),
            Decision::Deny => panic!("denied: {receipt:?}"),
        }
    }
    assert_eq!(answers.len(), 8);

    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fastmcp_server_over_streamable_http_is_bridged_and_policies_name_its_tools() {
    let python = require_mcp();
    let port = testkit::free_port().unwrap();
    let server = testkit::process::Service::spawn(
        Command::new(&python)
            .arg(server_script())
            .args(["http", &port.to_string()]),
    )
    .unwrap();
    eventually(WAIT, "the FastMCP server to listen", || async move {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log_text()));

    let policies = bridged_policies(None).unwrap();
    let mut mesh = Mesh::start().await;
    mesh.start_worker_on(policies.path().to_owned(), None).await;
    let config = mcp_bridge::Config {
        agent_id: "tools".into(),
        http: vec![format!("http://127.0.0.1:{port}/mcp")],
        tool_prefix: "http.".into(),
        call_timeout_secs: 10,
        nats_url: mesh.url(),
        ..Default::default()
    };
    let (stop, served) = bridge(&mesh, config, &["http.add", "http.echo"]).await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let wf = planner.workflow();

    // The mesh's name has the prefix; the server is called by its own.
    let sum = wf
        .call_tool("http.add", json!({"a": 1, "b": 2}))
        .on("tools")
        .await
        .unwrap();
    assert_eq!(sum, json!({"result": 3}));

    // `http.echo` is high risk in the entities: the shipped guardrail
    // forbids it, and the server never sees the call.
    let err = wf
        .call_tool("http.echo", json!({"text": "over http"}))
        .on("tools")
        .await
        .unwrap_err();
    let receipt = err.denial().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(receipt.decision, Decision::Deny);
    assert!(
        receipt
            .reasons
            .contains(&"forbid-high-risk-tools".to_owned()),
        "{:?}",
        receipt.reasons
    );
    let answered = wf
        .call_tool("http.calls", json!({}))
        .on("tools")
        .await
        .unwrap_err();
    assert!(
        matches!(answered.kind(), CallErrorKind::Denied(_)),
        "`http.calls` is in no entity, so no policy permits it: {answered}"
    );

    stop.cancel();
    served.await.unwrap();
    drop(server);
}

/// The whole chain: the official Python MCP client → the gateway → the
/// policy worker → the bridge → the FastMCP server and back, on a broker
/// with authorization, `cache.toml` caching `add`: the repeat is answered
/// by the mesh from its cache, and the server answers `add` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mcp_client_calls_a_bridged_fastmcp_server_through_the_gateway_and_the_cache_answers_the_repeat()
-> anyhow::Result<()> {
    let python = require_mcp();
    let policies = bridged_policies(Some("[tools.add]\nttl_secs = 600\nscope = \"shared\"\n"))?;
    let stack = Stack::start_on(20_000, Some(policies)).await?;
    let config = mcp_bridge::Config {
        agent_id: "tools".into(),
        stdio: vec![format!("{python} {} stdio", server_script().display())],
        call_timeout_secs: 10,
        nats_url: stack.mesh.url(),
        nkey_file: Some(stack.mesh.seed_file("tools")?),
        ..Default::default()
    };
    let watcher = Agent::builder("reviewer")
        .register_card(false)
        .nkey(stack.mesh.seed("reviewer")?)
        .connect(stack.mesh.url())
        .await?;
    let (stop, served) =
        mcp_support::bridge(watcher.directory(), config, &["add", "calls"]).await?;

    let steps = stack.client("bridged", async |_| Ok(())).await?;
    // tools/list has the server's tools, with their schemas.
    let listed = &steps["list"]["tools"];
    assert_eq!(listed["add"]["required"], json!(["a", "b"]), "{listed}");
    assert_eq!(listed["add"]["properties"]["a"]["type"], "integer");
    // The server's answer, then the same answer from the mesh's cache...
    for step in ["first", "repeat"] {
        let result = &steps[step];
        assert_eq!(result["is_error"], false, "{result}");
        assert_eq!(result["structured"], json!({"result": 5}), "{result}");
    }
    // ...so the server answered `add` once.
    let calls = &steps["calls"];
    assert_eq!(calls["structured"], json!({"result": 1}), "{calls}");
    let trace = steps["first"]["meta"]["trace_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(steps["repeat"]["meta"]["trace_id"], trace.as_str());

    // The audit: the first call missed the cache and its result filled
    // it; the repeat is a hit; `calls` is not cacheable. One trace.
    let want = [
        "planner\tio.agentmesh.tool.call\tadd\tallow\thit",
        "planner\tio.agentmesh.tool.call\tadd\tallow\tmiss",
        "planner\tio.agentmesh.tool.call\tcalls\tallow\t",
        "tools\tio.agentmesh.tool.result\tadd\tallow\tstored",
        "tools\tio.agentmesh.tool.result\tcalls\tallow\t",
    ];
    let sql = format!(
        "SELECT agent, type, subject, decision, cache FROM `{{db}}`.decisions FINAL \
         WHERE trace_id = '{trace}' ORDER BY agent, type, subject, cache FORMAT TabSeparated"
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

    stop.cancel();
    served.await?;
    watcher.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A bridged server that adds a tool at run time and says so
/// (`notifications/tools/list_changed`): the bridge lists its tools again
/// and writes the agent's card with the new tool, and the gateway's
/// `tools/list` follows, so the Python MCP client sees the tool and calls
/// it through the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tool_a_bridged_server_adds_at_run_time_reaches_the_card_and_the_gateways_tools_list()
-> anyhow::Result<()> {
    let python = require_mcp();
    let stack = Stack::start_on(20_000, Some(bridged_policies(None)?)).await?;
    let config = mcp_bridge::Config {
        agent_id: "tools".into(),
        stdio: vec![format!("{python} {} stdio", server_script().display())],
        call_timeout_secs: 10,
        nats_url: stack.mesh.url(),
        nkey_file: Some(stack.mesh.seed_file("tools")?),
        ..Default::default()
    };
    let watcher = Agent::builder("reviewer")
        .register_card(false)
        .nkey(stack.mesh.seed("reviewer")?)
        .connect(stack.mesh.url())
        .await?;
    let (stop, served) = mcp_support::bridge(watcher.directory(), config, &["learn"]).await?;
    let card = watcher.directory().get("tools").await?.unwrap();
    assert!(!card.serves("shout"), "{card:?}");

    let steps = stack.client("learn", async |_| Ok(())).await?;
    let before = steps["before"]["tools"].as_array().unwrap();
    assert!(before.contains(&json!("learn")), "{before:?}");
    assert!(!before.contains(&json!("shout")), "{before:?}");
    assert_eq!(steps["learn"]["is_error"], false, "{}", steps["learn"]);
    let after = steps["after"]["tools"].as_array().unwrap();
    assert!(after.contains(&json!("shout")), "{after:?}");
    let shout = &steps["shout"];
    assert_eq!(shout["is_error"], false, "{shout}");
    assert_eq!(shout["structured"], json!({"result": "HEY"}), "{shout}");

    // The card in `mesh-agents` carries the new tool's description and
    // schema, and still the others.
    let card = watcher.directory().get("tools").await?.unwrap();
    let spec = card.tools.iter().find(|t| t.name == "shout").unwrap();
    assert_eq!(spec.description, "Returns the text in capitals.");
    assert_eq!(spec.input_schema["required"], json!(["text"]));
    assert!(card.serves("add") && card.serves("learn"), "{card:?}");

    stop.cancel();
    served.await?;
    watcher.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
