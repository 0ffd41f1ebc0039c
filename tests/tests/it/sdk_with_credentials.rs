//! The positive path on a broker with authorization: the policy worker
//! (with its own key) and agents-sdk agents (each with its own key) run the
//! usual exchanges unchanged — handoff, receipts, tool calls found through
//! the directory, the directory's watch — and identity binding holds: the
//! subject token is the key's agent (broker), the `source` attribute must
//! match it (policy worker).

use agents_sdk::{Agent, CardChange, Decision, ToolCall, ToolSpec};
use async_nats::HeaderMap;
use e2e::{SecureNats, WAIT, start_worker};
use futures::StreamExt as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

async fn agent(
    mesh: &SecureNats,
    builder: agents_sdk::AgentBuilder,
    id: &str,
) -> anyhow::Result<Agent> {
    Ok(builder.nkey(mesh.seed(id)?).connect(mesh.url()).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_and_the_worker_work_unchanged_with_per_agent_keys() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "coder", "reviewer"]).await?;
    let worker = start_worker(&mesh).await?;

    let planner = agent(&mesh, Agent::builder("planner"), "planner").await?;
    let coder = agent(
        &mesh,
        Agent::builder("coder").tool(
            ToolSpec::new("code.search").description("search the repository"),
            |call: ToolCall| async move {
                let args: serde_json::Value = call.args()?;
                Ok(json!({"matches": [args["query"].clone()]}))
            },
        ),
        "coder",
    )
    .await?;

    // The directory lists and watches without consumers of its own.
    let mut watch = planner.directory().watch().await?;
    let first = tokio::time::timeout(WAIT, watch.next()).await?;
    assert!(
        matches!(&first, Some(Ok(CardChange::Registered(card))) if card.id == "coder" || card.id == "planner"),
        "{first:?}"
    );
    let ids: Vec<String> = planner
        .directory()
        .list()
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["coder", "planner"]);

    // A handoff: receipt to the planner, delivery to the coder.
    let wf = planner.workflow();
    let handoff = wf.handoff("coder", "write the parser test").await?;
    let receipt = planner.await_decision(&handoff.id).await?;
    assert_eq!(receipt.decision, Decision::Allow, "{receipt:?}");
    let mut deliveries = coder.deliveries().await?;
    let delivered = tokio::time::timeout(WAIT, deliveries.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no delivery"))??;
    assert_eq!(delivered.id(), handoff.id);
    assert_eq!(delivered.sender().as_str(), "planner");
    delivered.ack().await?;
    drop(deliveries);

    // A tool call, its provider found through the directory, its result
    // routed back through the policy worker.
    let stop = CancellationToken::new();
    let serving = tokio::spawn({
        let coder = coder.clone();
        let stop = stop.clone();
        async move { coder.serve(stop.cancelled_owned()).await }
    });
    let result = wf
        .call_tool("code.search", json!({"query": "fn parse"}))
        .timeout(WAIT)
        .await?;
    assert_eq!(result, json!({"matches": ["fn parse"]}));
    // The coder read the call from its own durable on MESH_CALL (granted
    // and provisioned like its delivery durable), and may read its counts.
    let admin = mesh.jetstream("meshctl").await?;
    let calls = admin
        .get_stream(schemas::subjects::STREAM_CALL)
        .await?
        .consumer_info("agent-coder")
        .await?
        .clone();
    assert_eq!(
        (calls.delivered.stream_sequence, calls.num_ack_pending),
        (1, 0),
        "{calls:?}"
    );
    assert_eq!(coder.pending().await?.calls, 0);
    // A denied call comes back as the receipt, not a timeout.
    let denied = wf
        .call_tool("shell.exec", json!({"command": "rm -rf /"}))
        .on("coder")
        .timeout(WAIT)
        .await;
    let denial = denied.err().and_then(|e| e.denial().cloned());
    assert!(
        denial.is_some_and(|r| r.reasons.contains(&"forbid-shell-exec".to_owned())),
        "shell.exec was not denied by policy"
    );
    stop.cancel();
    serving.await??;

    // Registering a card later shows in the watch.
    let _reviewer = agent(&mesh, Agent::builder("reviewer"), "reviewer").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(CardChange::Registered(card)))) if card.id == "reviewer" => break,
            Ok(Some(_)) => continue,
            other => anyhow::bail!("the watch did not show the reviewer's card: {other:?}"),
        }
    }

    worker.cancel();
    Ok(())
}

#[tokio::test]
async fn a_source_that_is_not_the_keys_agent_is_invalid() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "coder"]).await?;
    let worker = start_worker(&mesh).await?;
    let (coder, events) = mesh.connect_as("coder").await?;
    let mut receipts = coder.subscribe("mesh.decision.coder").await?;
    coder.flush().await?;

    // The coder's key may publish only on the coder's subjects (the broker
    // binds subject to key); inside, it claims to be the planner.
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "0190b4b2-0000-7000-8000-0000000000aa"),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.task.handoff"),
        ("ce-target", "coder"),
        ("ce-datacontenttype", "application/json"),
    ] {
        headers.insert(k, v);
    }
    e2e::jetstream(coder.clone())
        .publish_with_headers("mesh.ingress.coder.handoff", headers, "{}".into())
        .await?
        .await?;
    let receipt = tokio::time::timeout(WAIT, receipts.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no receipt"))?;
    let receipt: serde_json::Value = serde_json::from_slice(&receipt.payload)?;
    assert_eq!(receipt["decision"], "invalid", "{receipt}");
    assert_eq!(receipt["agent"], "coder", "{receipt}");
    assert!(
        receipt["errors"].to_string().contains("source"),
        "{receipt}"
    );
    // Nothing was routed.
    let admin = mesh.jetstream(broker_config::auth::ADMIN).await?;
    let mut deliver = admin.get_stream("MESH_DELIVER").await?;
    assert_eq!(deliver.info().await?.state.messages, 0);
    assert!(events.all().is_empty(), "{:?}", events.all());
    worker.cancel();
    Ok(())
}
