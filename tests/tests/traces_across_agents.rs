//! One trace across agents and the worker: the Python example planner
//! (Python SDK) works with the Rust `coder` (agents-sdk) through the policy
//! worker, all three exporting spans over OTLP/HTTP to a receiver in this
//! test; the workflow's trace is one tree — every span's parent is a span of
//! the trace, and only the planner's first step is a root.
//!
//! The worker runs in this process, so its spans go through the global
//! subscriber `telemetry::init_tracing` installs, as in the service binary;
//! one test per binary for that reason.

// Test helpers outside `#[test]` fns panic to fail the test, too.

#[path = "it/sdk_support/mod.rs"]
mod support;

#[path = "it/python_support/mod.rs"]
mod python_support;

use std::collections::{BTreeMap, BTreeSet};

use python_support::{coder, example, require, serve_coder};
use support::*;
use telemetry::testing::{OtlpReceiver, ReceivedSpan};
use testkit::eventually;

/// The spans of `trace` received so far, by span id.
fn trace_spans(receiver: &OtlpReceiver, trace: &str) -> BTreeMap<String, ReceivedSpan> {
    receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace)
        .map(|s| (s.span_id.clone(), s))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_across_two_agents_and_the_worker_is_one_trace() {
    require("opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http").unwrap();
    let receiver = OtlpReceiver::start().await.unwrap();
    let guard = telemetry::init_tracing(
        "policy-worker",
        &telemetry::OpsConfig {
            otlp_endpoint: Some(receiver.endpoint()),
            ..Default::default()
        },
    )
    .unwrap();
    let mesh = Mesh::with_worker().await;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.txt"), "the needle is here\n").unwrap();
    let coder = mesh
        .agent(coder(root.path().to_path_buf()).otlp_endpoint(receiver.endpoint()))
        .await;
    let stop = serve_coder(coder.clone());

    let out = example(
        "planner.py",
        vec![
            "--nats-url".into(),
            mesh.url(),
            "--query".into(),
            "needle".into(),
        ],
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())],
    )
    .await
    .unwrap();
    let trace = out
        .lines()
        .find_map(|l| l.strip_prefix("trace "))
        .unwrap_or_else(|| panic!("no trace id in:\n{out}"))
        .to_owned();

    // Everything the workflow caused: the planner's steps, the worker's
    // decisions on each, the coder's tool result, reply and handoff work.
    let expected = [
        ("agentmesh-agent-planner", "prompt planner"),
        ("agentmesh-agent-planner", "tool.call planner"),
        ("agentmesh-agent-planner", "task.handoff planner"),
        ("agentmesh-agent-planner", "output planner"),
        ("agentmesh-agent-coder", "tool.result coder"),
        ("agentmesh-agent-coder", "message coder"),
        ("agentmesh-agent-coder", "reasoning coder"),
        ("agentmesh-agent-coder", "output coder"),
        ("policy-worker", "policy.decision"),
        ("policy-worker", "policy.delivery"),
    ];
    coder.close().await.unwrap();
    guard.flush().await;
    let spans = eventually(WAIT, "the whole workflow's spans, joined up", || async {
        let spans = trace_spans(&receiver, &trace);
        let complete = expected.iter().all(|(service, name)| {
            spans
                .values()
                .any(|s| s.service == *service && s.name == *name)
        });
        let joined = spans
            .values()
            .all(|s| s.parent_span_id.is_empty() || spans.contains_key(&s.parent_span_id));
        (complete && joined).then_some(spans)
    })
    .await
    .unwrap_or_else(|e| {
        let got: BTreeSet<_> = trace_spans(&receiver, &trace)
            .values()
            .map(|s| {
                format!(
                    "{} {} {} <- {}",
                    s.service, s.name, s.span_id, s.parent_span_id
                )
            })
            .collect();
        panic!("{e}; spans of {trace}: {got:#?}")
    });
    stop.cancel();
    let services: BTreeSet<_> = spans.values().map(|s| s.service.as_str()).collect();
    println!(
        "trace {trace}: {} spans from {services:?}, every parent present",
        spans.len()
    );

    // One root: the planner's prompt. Every other span has its parent here.
    let roots: Vec<_> = spans
        .values()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(roots[0].name, "prompt planner");
    let by_name = |name: &str| spans.values().find(|s| s.name == name).unwrap().clone();
    // The planner calls `code.search` (answered) and `shell.exec` (denied).
    let call = spans
        .values()
        .find(|s| {
            s.name == "tool.call planner"
                && s.attributes.get("gen_ai.tool.name").map(String::as_str) == Some("code.search")
        })
        .unwrap()
        .clone();
    let result = by_name("tool.result coder");
    // The coder's result follows the planner's call; the worker decides
    // under each step it decides on.
    assert_eq!(result.parent_span_id, call.span_id);
    assert!(
        spans
            .values()
            .any(|s| s.name == "policy.decision" && s.parent_span_id == call.span_id)
    );
    assert!(
        spans
            .values()
            .any(|s| s.name == "policy.decision" && s.parent_span_id == result.span_id)
    );
    // GenAI semantic conventions.
    assert_eq!(call.attributes["gen_ai.operation.name"], "execute_tool");
    assert_eq!(call.attributes["gen_ai.tool.name"], "code.search");
    assert_eq!(call.attributes["gen_ai.agent.name"], "planner");
    assert_eq!(result.attributes["gen_ai.tool.name"], "code.search");
    assert_eq!(result.attributes["gen_ai.agent.name"], "coder");
    assert_eq!(
        result.attributes["gen_ai.tool.call.id"],
        call.attributes["agentmesh.event.id"]
    );
    assert_eq!(
        by_name("task.handoff planner").attributes["gen_ai.operation.name"],
        "invoke_agent"
    );
}
