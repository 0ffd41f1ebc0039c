//! `meshctl demo`: a planner → coder → reviewer workflow published as
//! CloudEvents (binary mode) on `mesh.ingress.<agent>.<step>`, then its
//! decision tree read back from ClickHouse once every step and every
//! decision has arrived there.
//!
//! The sequence lives in [`workflow`] alone, so publishing it through the
//! agents SDK later means changing [`publish`] only.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use schemas::{EventBuilder, EventBuilderV10, EventType, TraceParent, encode_binary, subjects};
use serde_json::{Value, json};

use crate::servers::Endpoints;
use crate::tree;

/// One step of the demo workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoStep {
    /// The publishing agent.
    pub agent: &'static str,
    /// The `<step>` token of the ingress subject.
    pub step: &'static str,
    /// The catalogue type.
    pub event_type: EventType,
    /// Index of the step this one answers or follows (its `causationid`).
    pub caused_by: Option<usize>,
    /// The recipient, for handoffs and results.
    pub target: Option<&'static str>,
    /// The tool of a tool call (`subject`).
    pub tool: Option<&'static str>,
    /// The JSON data.
    pub data: Value,
}

/// The demo: a prompt, reasoning, a handoff to the coder, an allowed tool
/// call with its result, a denied `shell.exec` call, a memory update, a
/// handoff to the reviewer and the final output.
pub fn workflow() -> Vec<DemoStep> {
    use EventType::*;
    let step = |agent, step, event_type, caused_by, target, tool, data| DemoStep {
        agent,
        step,
        event_type,
        caused_by,
        target,
        tool,
        data,
    };
    #[rustfmt::skip]
    let steps = vec![
        step("planner", "prompt", Prompt, None, None, None,
            json!({"text": "Add input validation to the signup handler and get it reviewed."})),
        step("planner", "reasoning", Reasoning, Some(0), None, None,
            json!({"text": "Two parts: the coder changes signup.rs, the reviewer checks it."})),
        step("planner", "handoff", TaskHandoff, Some(1), Some("coder"), None,
            json!({"task": "Validate email and password length in signup.rs", "acceptance": "tests pass"})),
        step("coder", "reasoning", Reasoning, Some(2), None, None,
            json!({"text": "Find the handler first, then run the tests."})),
        step("coder", "tool_call", ToolCall, Some(3), None, Some("code.search"),
            json!({"query": "fn signup", "path": "src/"})),
        step("coder", "tool_result", ToolResult, Some(4), Some("coder"), None,
            json!({"matches": [{"file": "src/handlers/signup.rs", "line": 42}]})),
        step("coder", "tool_call", ToolCall, Some(3), None, Some("shell.exec"),
            json!({"command": "rm -rf target && cargo test"})),
        step("coder", "memory", MemoryUpdate, Some(5), None, None,
            json!({"key": "signup.handler", "value": "src/handlers/signup.rs:42"})),
        step("coder", "handoff", TaskHandoff, Some(7), Some("reviewer"), None,
            json!({"task": "Review the validation in signup.rs", "diff": "+ if email.is_empty() { return Err(..) }"})),
        step("reviewer", "reasoning", Reasoning, Some(8), None, None,
            json!({"text": "Checks are present; messages are clear."})),
        step("reviewer", "output", Output, Some(9), None, None,
            json!({"verdict": "approved", "summary": "Validation added to the signup handler."})),
    ];
    steps
}

/// Publishes the steps as one workflow (a fresh trace), each binary-mode
/// with a new span of the trace, waiting for JetStream to store each.
/// Returns the trace and the event ids, in step order.
pub async fn publish(
    js: &async_nats::jetstream::Context,
    steps: &[DemoStep],
) -> anyhow::Result<(TraceParent, Vec<String>)> {
    let trace = TraceParent::mint();
    let mut ids: Vec<String> = Vec::with_capacity(steps.len());
    for step in steps {
        let id = uuid::Uuid::now_v7().to_string();
        let mut builder = EventBuilderV10::new()
            .id(id.clone())
            .source(format!("/agents/{}", step.agent))
            .ty(step.event_type.as_str())
            .time(chrono::Utc::now())
            .extension(schemas::ext::TRACEPARENT, trace.child().to_string())
            .data("application/json", step.data.clone());
        if let Some(cause) = step.caused_by {
            let parent = ids
                .get(cause)
                .context("a demo step is caused by a later one")?;
            builder = builder.extension(schemas::ext::CAUSATIONID, parent.clone());
        }
        if let Some(target) = step.target {
            builder = builder.extension(schemas::ext::TARGET, target);
        }
        if let Some(tool) = step.tool {
            builder = builder.subject(tool);
        }
        let event = builder.build().context("building a demo event")?;
        let (headers, payload) = encode_binary(&event);
        let subject = subjects::ingress(step.agent, step.step);
        js.publish_with_headers(subject.clone(), headers, payload)
            .await
            .with_context(|| format!("publishing on `{subject}`"))?
            .await
            .with_context(|| format!("JetStream did not store the event on `{subject}`"))?;
        ids.push(id);
    }
    Ok((trace, ids))
}

/// Polls ClickHouse until every one of `ids` has its event row and its
/// decision, then returns the tree.
pub async fn wait_for_tree(
    endpoints: &Endpoints,
    trace_id: &str,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<tree::Node>> {
    let client = endpoints.audit_db();
    let deadline = Instant::now() + timeout;
    let mut last = (0, 0);
    loop {
        match tree::fetch(&client, trace_id).await {
            Ok(nodes) => {
                let present = ids
                    .iter()
                    .filter(|id| nodes.iter().any(|n| &n.event_id == *id))
                    .count();
                let decided = ids
                    .iter()
                    .filter(|id| {
                        nodes
                            .iter()
                            .any(|n| &n.event_id == *id && !n.decision.is_empty())
                    })
                    .count();
                if present == ids.len() && decided == ids.len() {
                    return Ok(nodes);
                }
                last = (present, decided);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            let (present, decided) = last;
            bail!(
                "after {timeout:?}, ClickHouse has {present}/{n} of the demo's events and {decided}/{n} decisions for trace {trace_id}: \
                 is the stack up (`meshctl status`)? The policy worker decides, the audit sink writes to ClickHouse.",
                n = ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_covers_the_story() {
        let steps = workflow();
        let has = |t: EventType| steps.iter().any(|s| s.event_type == t);
        for t in [
            EventType::Prompt,
            EventType::Reasoning,
            EventType::TaskHandoff,
            EventType::ToolResult,
            EventType::MemoryUpdate,
            EventType::Output,
        ] {
            assert!(has(t), "{t}");
        }
        let agents: Vec<_> = steps.iter().map(|s| s.agent).collect();
        for a in ["planner", "coder", "reviewer"] {
            assert!(agents.contains(&a));
        }
        assert!(steps.iter().any(|s| s.tool == Some("code.search")));
        assert!(steps.iter().any(|s| s.tool == Some("shell.exec")));
        // Causes always come earlier; exactly one root.
        assert!(
            steps
                .iter()
                .enumerate()
                .all(|(i, s)| s.caused_by.is_none_or(|c| c < i))
        );
        assert_eq!(steps.iter().filter(|s| s.caused_by.is_none()).count(), 1);
        // Every step is a valid mesh event.
        for s in &steps {
            assert!(schemas::AgentId::new(s.agent).is_ok());
            assert_eq!(s.event_type == EventType::ToolCall, s.tool.is_some());
        }
    }
}
