//! A tool call's arguments checked against the input schema in its tool's
//! agent card: the real policy worker on the shipped policies, agents on
//! the Rust SDK.

// Test helpers outside `#[test]` fns panic to fail the test, too.
#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::sdk_support as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use agents_sdk::{Agent, AgentCard, CallErrorKind, Decision, ToolCall, ToolSpec};
use schemas::subjects;
use serde_json::{Value, json};
use support::*;
use testkit::eventually;
use tokio_util::sync::CancellationToken;

fn serve(agent: &Agent) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let handle = tokio::spawn({
        let agent = agent.clone();
        let token = token.clone();
        async move { agent.serve(token.cancelled_owned()).await.unwrap() }
    });
    (token, handle)
}

fn search_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"query": {"type": "string", "minLength": 1}, "limit": {"type": "integer"}},
        "required": ["query"]
    })
}

/// The coder serving `code.search` (with `schema`, when given) and
/// counting its runs.
fn coder(runs: Arc<AtomicUsize>, schema: Option<Value>) -> agents_sdk::AgentBuilder {
    let mut spec = ToolSpec::new("code.search");
    if let Some(schema) = schema {
        spec = spec.input_schema(schema);
    }
    Agent::builder("coder").tool(spec, move |call: ToolCall| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(json!({"arguments": call.arguments()}))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_that_break_the_schema_are_invalid_and_name_the_violation() {
    let mesh = Mesh::with_worker().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let coder = mesh.agent(coder(runs.clone(), Some(search_schema()))).await;
    let (stop, served) = serve(&coder);
    let planner = mesh.agent(Agent::builder("planner")).await;
    let wf = planner.workflow();

    let err = wf
        .call_tool("code.search", json!({"query": "", "limit": "ten"}))
        .on("coder")
        .await
        .unwrap_err();
    let receipt = err
        .denial()
        .unwrap_or_else(|| panic!("not a refusal: {err}"));
    assert_eq!(receipt.decision, Decision::Invalid, "{receipt:?}");
    assert_eq!(receipt.reasons, ["input-schema"]);
    assert_eq!(receipt.errors.len(), 2, "{:?}", receipt.errors);
    let errors = receipt.errors.join("\n");
    assert!(errors.contains("`code.search` at `/query`"), "{errors}");
    assert!(errors.contains("`code.search` at `/limit`"), "{errors}");
    assert!(errors.contains("integer"), "{errors}");
    assert!(!errors.contains("ten"), "values are not repeated: {errors}");
    assert_eq!(receipt.subject.as_deref(), Some("code.search"));
    assert_eq!(receipt.target.as_deref(), Some("coder"));
    assert_eq!(receipt.trace_id, wf.trace_id());
    assert!(
        err.to_string().contains("rejected as invalid"),
        "the SDK's message says why: {err}"
    );
    assert!(err.to_string().contains("/limit"), "{err}");

    // Dead-lettered with the first violation, never delivered, never run.
    let dead = mesh
        .messages_on(subjects::STREAM_DEAD, "mesh.dead.planner")
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "Mesh-Decision").as_deref(),
        Some("invalid")
    );
    let reason = header(&dead[0], "Mesh-Reason").unwrap();
    assert!(reason.contains("code.search"), "{reason}");
    assert!(
        mesh.messages_on(subjects::STREAM_CALL, "mesh.call.coder.planner")
            .await
            .unwrap()
            .is_empty()
    );

    // Arguments that fit pass and run.
    let result = wf
        .call_tool("code.search", json!({"query": "parse", "limit": 3}))
        .on("coder")
        .await
        .unwrap();
    assert_eq!(result, json!({"arguments": {"query": "parse", "limit": 3}}));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A missing required argument, and no object at all.
    for (arguments, at) in [(json!({}), "at `/`"), (json!("parse"), "at `/`")] {
        let err = wf
            .call_tool("code.search", arguments)
            .on("coder")
            .await
            .unwrap_err();
        let receipt = err.denial().unwrap();
        assert_eq!(receipt.decision, Decision::Invalid);
        assert!(receipt.errors[0].contains(at), "{:?}", receipt.errors);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_without_an_input_schema_takes_any_arguments() {
    let mesh = Mesh::with_worker().await;
    let runs = Arc::new(AtomicUsize::new(0));
    // The card lists the tool without `inputSchema` (written as raw JSON:
    // the SDK's `ToolSpec` always has one).
    let coder = mesh
        .agent(coder(runs.clone(), None).register_card(false))
        .await;
    let card = json!({"name": "coder", "tools": [{"name": "code.search"}]});
    let js = async_nats::jetstream::new(async_nats::connect(mesh.url()).await.unwrap());
    js.get_key_value(subjects::BUCKET_AGENTS)
        .await
        .unwrap()
        .put("coder", serde_json::to_vec(&card).unwrap().into())
        .await
        .unwrap();
    let (stop, served) = serve(&coder);
    let planner = mesh.agent(Agent::builder("planner")).await;
    let wf = planner.workflow();

    for arguments in [json!("not an object"), json!({"query": 5}), json!(null)] {
        let result = wf
            .call_tool("code.search", arguments.clone())
            .on("coder")
            .await
            .unwrap();
        assert_eq!(result, json!({"arguments": arguments}));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_card_revision_is_compiled_and_checked() {
    let mesh = Mesh::with_worker().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let coder = mesh.agent(coder(runs.clone(), Some(search_schema()))).await;
    let (stop, served) = serve(&coder);
    let planner = mesh.agent(Agent::builder("planner")).await;
    let wf = planner.workflow();

    let numeric = json!({"query": 42});
    let err = wf
        .call_tool("code.search", numeric.clone())
        .on("coder")
        .await
        .unwrap_err();
    assert_eq!(err.denial().map(|r| r.decision), Some(Decision::Invalid));

    // The coder now takes a number as the query.
    let card = AgentCard::new("coder").tool(ToolSpec::new("code.search").input_schema(json!({
        "type": "object",
        "properties": {"query": {"type": "integer"}},
        "required": ["query"]
    })));
    coder.directory().register(&card).await.unwrap();
    let result = eventually(testkit::WAIT, "the new schema to be checked", || {
        let call = wf.call_tool("code.search", numeric.clone()).on("coder");
        async move {
            match call.await {
                Ok(result) => Some(result),
                Err(e) if matches!(e.kind(), CallErrorKind::Denied(_)) => None,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(result, json!({"arguments": numeric}));
    // ...and the old shape is refused now.
    let err = wf
        .call_tool("code.search", json!({"query": "parse"}))
        .on("coder")
        .await
        .unwrap_err();
    let receipt = err.denial().unwrap();
    assert_eq!(receipt.decision, Decision::Invalid);
    assert!(receipt.errors[0].contains("/query"), "{:?}", receipt.errors);

    // A deleted card checks nothing.
    coder.directory().remove("coder").await.unwrap();
    eventually(testkit::WAIT, "the removed card to check nothing", || {
        let call = wf
            .call_tool("code.search", json!({"query": "parse"}))
            .on("coder");
        async move { call.await.ok() }
    })
    .await
    .unwrap();

    stop.cancel();
    served.await.unwrap();
}
