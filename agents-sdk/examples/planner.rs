//! An agent that records its steps, calls tools and hands off: `planner`
//! asks `code.search` (served by the `tool_server` example), tries
//! `shell.exec` (which policy forbids), and hands the task to `coder`.
//!
//! Run the local stack and the `tool_server` example, then, with the
//! planner's key (authorization on):
//! `cargo run -p agents-sdk --example planner -- --nkey-file .agentmesh/auth/agents/planner.nk "add a test for the parser"`
//! (or `AGENTMESH_NKEY_FILE`; see the `tool_server` example).
//! It prints the trace id; `meshctl trace <id>` shows the decision tree.

use std::time::Duration;

use agents_sdk::{Agent, CallErrorKind};
use serde_json::json;

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = common::Options::parse(&["planner"])?;
    let task = options
        .args
        .first()
        .cloned()
        .unwrap_or_else(|| "add a test for the parser".into());

    let agent = options
        .keyed(Agent::builder("planner"), "planner")
        .connect(options.url())
        .await?;
    let wf = agent.workflow();
    println!("trace {}", wf.trace_id());

    wf.prompt(&task).await?;
    wf.reasoning("First find where the code lives.").await?;

    // The tool's provider is found by its card in `mesh-agents`.
    let found = wf
        .call_tool("code.search", json!({"query": "fn ", "limit": 3}))
        .timeout(Duration::from_secs(10))
        .await?;
    println!("code.search: {found}");
    wf.observation(format!("found {found}")).await?;

    // Policy forbids `shell.exec` for every agent: a typed denial.
    match wf
        .call_tool("shell.exec", json!({"cmd": "cargo test"}))
        .on("coder")
        .await
    {
        Err(e) if matches!(e.kind(), CallErrorKind::Denied(_)) => {
            let receipt = e.denial().map(|r| r.reasons.join(", ")).unwrap_or_default();
            println!("shell.exec denied by: {receipt}");
        }
        other => println!("shell.exec: {other:?}"),
    }

    let handoff = wf
        .handoff("coder", &task)
        .with("context", json!({"hint": found}))
        .await?;
    let receipt = agent.await_decision(&handoff.id).await?;
    println!(
        "handoff to coder: {} ({})",
        receipt.decision,
        receipt.reasons.join(", ")
    );

    wf.output(format!("handed `{task}` to coder")).await?;
    println!("meshctl trace {}", wf.trace_id());
    Ok(())
}
