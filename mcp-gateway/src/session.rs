//! One MCP session: `tools/list` and `tools/call` for the request's caller,
//! and `notifications/tools/list_changed` when the cards or the policies
//! change.
//!
//! A session is one mesh workflow: its calls are steps of one trace, each
//! following the previous, unless a request carries its own W3C trace
//! context (`_meta.traceparent`, SEP-414, or the HTTP `traceparent` header),
//! which the call then continues. What a call returns is decided by
//! [`call_result`], a pure function of the SDK's answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agents_sdk::{CallError, CallErrorKind, TraceParent, Workflow};
use rmcp::ErrorData as McpError;
use rmcp::model::SubscriptionFilter;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, MetaObject, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::{NotificationContext, RequestContext, RoleServer, SubscriptionContext};
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::agents::{Link, Pool};
use crate::auth::Caller;
use crate::policies::Policies;
use crate::tools;

/// The `_meta` key under which a result names its mesh decision and trace.
pub(crate) const META_KEY: &str = "io.agentmesh/call";

/// What every session shares.
pub(crate) struct Gateway {
    pub pool: Pool,
    pub policies: Policies,
    pub call_timeout: Duration,
    pub metrics: telemetry::McpMetrics,
}

/// One session's handler (rmcp makes one per session).
pub(crate) struct Session {
    gw: Arc<Gateway>,
    /// The session's workflow per calling agent (one in practice).
    workflows: Mutex<HashMap<String, Workflow>>,
    /// Cancels the session's notification task when the session ends.
    alive: CancellationToken,
    _guard: DropGuard,
}

impl Session {
    pub(crate) fn new(gw: Arc<Gateway>) -> Self {
        let alive = CancellationToken::new();
        Self {
            gw,
            workflows: Mutex::new(HashMap::new()),
            _guard: alive.clone().drop_guard(),
            alive,
        }
    }

    async fn link(&self, caller: &Caller) -> Result<Arc<Link>, McpError> {
        self.gw.pool.link(&caller.agent).await.map_err(|e| {
            tracing::warn!(agent = %caller.agent, error = %e, "Cannot act as the caller.");
            McpError::internal_error(e.to_string(), None)
        })
    }

    fn workflow(&self, link: &Link, caller: &Caller, trace: Option<TraceParent>) -> Workflow {
        if let Some(trace) = trace {
            return link.agent.continue_trace(trace, None);
        }
        match self.workflows.lock() {
            Ok(mut workflows) => workflows
                .entry(caller.agent.clone())
                .or_insert_with(|| link.agent.workflow())
                .clone(),
            Err(_) => link.agent.workflow(),
        }
    }
}

/// What makes a caller's tool list change: the cards, the policies.
struct Changes {
    cards: tokio::sync::watch::Receiver<u64>,
    policies: tokio::sync::watch::Receiver<Arc<policy_engine::PolicyBundle>>,
}

impl Changes {
    /// Waits for the next change; `false` once `until` is cancelled or the
    /// gateway stops.
    async fn next(&mut self, until: &CancellationToken) -> bool {
        tokio::select! {
            () = until.cancelled() => false,
            changed = self.cards.changed() => changed.is_ok(),
            changed = self.policies.changed() => changed.is_ok(),
        }
    }
}

impl Session {
    fn changes(&self) -> Changes {
        Changes {
            cards: self.gw.pool.subscribe(),
            policies: self.gw.policies.subscribe(),
        }
    }
}

/// The caller the HTTP layer authenticated for this request.
fn caller_of(extensions: &rmcp::model::Extensions) -> Result<Caller, McpError> {
    extensions
        .get::<hyper::http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| McpError::internal_error("request without an authenticated caller", None))
}

/// The request's trace context: `_meta.traceparent`, else the HTTP header.
/// One that does not parse is ignored (the session's trace is used).
fn trace_of(context: &RequestContext<RoleServer>) -> Option<TraceParent> {
    let from_meta = context.meta.get_traceparent().map(str::to_owned);
    let from_header = || {
        context
            .extensions
            .get::<hyper::http::request::Parts>()
            .and_then(|p| p.headers.get("traceparent"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    from_meta
        .or_else(from_header)
        .and_then(|tp| tp.trim().parse().ok())
}

impl rmcp::ServerHandler for Session {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "agentmesh-mcp-gateway",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(
            "The tools of an agentmesh mesh. Every call is a tool.call of your agent, decided by the mesh's policies and audited; a denied call returns an error with the policies' reasons and the decision id.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let caller = caller_of(&context.extensions)?;
        let link = self.link(&caller).await?;
        let cards = link.cards();
        let offered = tools::offered(&cards);
        let policies = self.gw.policies.current();
        Ok(ListToolsResult::with_all_items(tools::visible(
            &offered,
            &policies,
            &caller.agent,
        )))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let caller = caller_of(&context.extensions)?;
        let link = self.link(&caller).await?;
        let tool = request.name.to_string();
        let provider = tools::offered(&link.cards())
            .into_iter()
            .find(|o| o.spec.name == tool)
            .map(|o| o.provider);
        let started = std::time::Instant::now();
        let wf = self.workflow(&link, &caller, trace_of(&context));
        let args = Value::Object(request.arguments.unwrap_or_default());
        let mut call = wf
            .call_tool(tool.clone(), args)
            .timeout(self.gw.call_timeout);
        if let Some(provider) = provider {
            call = call.on(provider);
        }
        let outcome = tokio::select! {
            outcome = call => outcome,
            // The client cancelled the request (`notifications/cancelled`):
            // the call stays in the mesh and its audit; only the wait ends.
            () = context.ct.cancelled() => {
                return Err(McpError::internal_error("the client cancelled the call", None));
            }
        };
        let kind = match &outcome {
            Ok(_) => "ok",
            Err(e) if e.denial().is_some() => "denied",
            Err(e) if e.is_timeout() => "timed_out",
            Err(_) => "error",
        };
        self.gw.metrics.call(kind, started.elapsed());
        let result = call_result(&tool, &wf.trace_id(), outcome);
        tracing::debug!(
            agent = %caller.agent, %tool, trace_id = %wf.trace_id(),
            is_error = ?result.is_error, "Tool call answered."
        );
        Ok(result.into())
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        let Ok(caller) = caller_of(&context.extensions) else {
            return;
        };
        // Connect now, so the cards are watched from the session's start.
        if self.link(&caller).await.is_err() {
            return;
        }
        let mut changes = self.changes();
        let alive = self.alive.clone();
        let peer = context.peer;
        tokio::spawn(async move {
            while changes.next(&alive).await {
                if peer.notify_tool_list_changed().await.is_err() {
                    return;
                }
            }
        });
    }

    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut filter = SubscriptionFilter::new();
        filter.tools_list_changed = Some(true);
        Some(filter)
    }

    /// `subscriptions/listen` (2026-07-28, no session): the same
    /// notifications on the listen request's stream.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let mut changes = self.changes();
        let ended = CancellationToken::new();
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                more = changes.next(&ended) => if !more { return Ok(()) },
            }
            if context.sink().notify_tool_list_changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

/// What the MCP client gets for the SDK's answer to a call of `tool` in
/// trace `trace_id`: the tool's result, or a tool error (`isError: true`)
/// that says why — denied (with the policies and the decision id), invalid,
/// timed out, no provider, or the tool's own error.
pub(crate) fn call_result(
    tool: &str,
    trace_id: &str,
    outcome: Result<Value, CallError>,
) -> CallToolResult {
    let mut meta = serde_json::Map::new();
    meta.insert("trace_id".into(), json!(trace_id));
    let mut result = match outcome {
        Ok(value) => {
            let text = match &value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
            if value.is_object() {
                result.structured_content = Some(value);
            }
            result
        }
        Err(error) => {
            let text = match error.kind_ref() {
                CallErrorKind::Denied(receipt) => {
                    meta.insert("decision".into(), json!(receipt.decision.to_string()));
                    meta.insert("decision_id".into(), json!(receipt.decision_id));
                    meta.insert("reasons".into(), json!(receipt.reasons));
                    meta.insert("errors".into(), json!(receipt.errors));
                    meta.insert("event_id".into(), json!(receipt.event_id));
                    meta.insert("policy_hash".into(), json!(receipt.policy_hash));
                    format!(
                        "{error}; decision `{}` (decision id {})",
                        receipt.decision, receipt.decision_id
                    )
                }
                CallErrorKind::TimedOut { after, .. } => {
                    meta.insert("timed_out_ms".into(), json!(after.as_millis() as u64));
                    format!("timed out: `{tool}`: {error}")
                }
                CallErrorKind::ToolFailed { .. } => format!("tool error: {error}"),
                _ => error.to_string(),
            };
            CallToolResult::error(vec![ContentBlock::text(text)])
        }
    };
    let mut object = MetaObject::new();
    object.0.insert(META_KEY.into(), Value::Object(meta));
    result.meta = Some(object);
    result
}

#[cfg(test)]
mod tests {
    use agents_sdk::{Decision, DecisionReceipt};

    use super::*;

    fn text(result: &CallToolResult) -> String {
        serde_json::to_value(&result.content).unwrap()[0]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn meta(result: &CallToolResult) -> Value {
        result.meta.as_ref().unwrap().0[META_KEY].clone()
    }

    #[test]
    fn a_result_is_the_tools_value_in_text_and_structured() {
        let r = call_result("t", "abc", Ok(json!({"hits": 3})));
        assert_eq!(r.is_error, Some(false));
        assert_eq!(text(&r), r#"{"hits":3}"#);
        assert_eq!(r.structured_content, Some(json!({"hits": 3})));
        assert_eq!(meta(&r)["trace_id"], "abc");
        let r = call_result("t", "abc", Ok(json!("plain")));
        assert_eq!(text(&r), "plain");
        assert_eq!(r.structured_content, None);
    }

    #[test]
    fn a_deny_is_a_tool_error_with_the_reasons_and_the_decision_id() {
        let receipt: DecisionReceipt = serde_json::from_value(json!({
            "event_id": "e1", "trace_id": "abc", "decision": "deny",
            "reasons": ["forbid-shell-exec"], "errors": [], "policy_hash": "h",
            "decision_id": "d1", "agent": "planner", "type": "io.agentmesh.tool.call",
            "subject": "shell.exec", "decided_at": "2026-01-01T00:00:00Z", "eval_micros": 1,
            "ingress_subject": "mesh.ingress.planner.tool_call", "trace_derived": false
        }))
        .unwrap();
        assert_eq!(receipt.decision, Decision::Deny);
        let r = call_result(
            "shell.exec",
            "abc",
            Err(CallError::new(CallErrorKind::Denied(Box::new(receipt)))),
        );
        assert_eq!(r.is_error, Some(true));
        let t = text(&r);
        assert!(t.contains("forbid-shell-exec") && t.contains("d1"), "{t}");
        let m = meta(&r);
        assert_eq!(m["decision"], "deny");
        assert_eq!(m["decision_id"], "d1");
        assert_eq!(m["reasons"], json!(["forbid-shell-exec"]));
    }

    #[test]
    fn a_timeout_and_a_tool_failure_say_so() {
        let r = call_result(
            "slow",
            "abc",
            Err(CallError::new(CallErrorKind::TimedOut {
                after: Duration::from_millis(250),
                decision: Some(Decision::Allow),
            })),
        );
        assert_eq!(r.is_error, Some(true));
        assert!(text(&r).starts_with("timed out: `slow`"), "{}", text(&r));
        assert_eq!(meta(&r)["timed_out_ms"], 250);
        let r = call_result(
            "t",
            "abc",
            Err(CallError::new(CallErrorKind::ToolFailed {
                tool: "t".into(),
                message: "disk full".into(),
            })),
        );
        assert_eq!(r.is_error, Some(true));
        assert!(text(&r).contains("disk full"));
    }
}
