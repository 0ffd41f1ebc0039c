//! A2A over NATS: an agent answers A2A JSON-RPC requests that reach it
//! through the mesh (`docs/a2a.md`).
//!
//! A request is an `io.agentmesh.message` whose `subject` is [`SUBJECT`]
//! and whose data is the JSON-RPC request; it went through the policy
//! worker like any message (Cedar decided, the audit recorded it). The
//! answer is an `io.agentmesh.message` back to the caller, same `subject`,
//! `causationid` = the request's id, whose data is the JSON-RPC response.
//! `SendMessage`, `GetTask` and `CancelTask` (A2A 1.0, ProtoJSON shapes) and
//! `message/send`, `tasks/get` and `tasks/cancel` (A2A 0.3 shapes) are
//! served. A message runs the agent's handler to its end, so the task it
//! makes is `completed` (or `failed`) when the answer leaves; tasks are kept
//! (the latest [`TASKS_KEPT`]) for `GetTask`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

pub use crate::card::{PROTOCOL_BINDING, PROTOCOL_VERSION, interface_url};
use crate::error::{PublishError, ToolError};
use crate::inner::{A2aService, Agent, BoxFuture};
use crate::received::Received;
use crate::workflow::Workflow;

/// The CloudEvents `subject` of A2A requests and responses on the mesh.
pub const SUBJECT: &str = "a2a";
/// How many tasks an agent keeps for `GetTask`.
pub const TASKS_KEPT: usize = 1024;

/// Whether `received` is an A2A request (or response) of this binding.
pub fn is_a2a(received: &Received) -> bool {
    received.event_type() == schemas::EventType::Message && received.subject() == Some(SUBJECT)
}

/// One A2A message sent to this agent, as its handler sees it.
#[derive(Debug, Clone)]
pub struct A2aRequest {
    agent: Agent,
    received: Received,
    message: Value,
    task_id: String,
    context_id: String,
}

impl A2aRequest {
    /// The A2A `Message` as the caller sent it (1.0 or 0.3 JSON).
    pub fn message(&self) -> &Value {
        &self.message
    }

    /// The text of its text parts, one per line.
    pub fn text(&self) -> String {
        self.message["parts"]
            .as_array()
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// The calling agent.
    pub fn caller(&self) -> &schemas::AgentId {
        self.received.sender()
    }

    /// The task this message makes.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The A2A context.
    pub fn context_id(&self) -> &str {
        &self.context_id
    }

    /// The caller's trace, continued after the request: steps published
    /// here join the caller's workflow.
    pub fn workflow(&self) -> Workflow {
        Workflow::after(&self.agent, &self.received)
    }
}

/// What an A2A handler answers: the parts of the agent's reply, which
/// become the completed task's artifact and its last history message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct A2aReply {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Data(Value),
}

impl A2aReply {
    /// A reply of one text part.
    pub fn text(text: impl Into<String>) -> Self {
        Self::default().and_text(text)
    }

    /// A reply of one structured-data part.
    pub fn data(data: Value) -> Self {
        Self::default().and_data(data)
    }

    /// Adds a text part.
    pub fn and_text(mut self, text: impl Into<String>) -> Self {
        self.parts.push(Part::Text(text.into()));
        self
    }

    /// Adds a structured-data part.
    pub fn and_data(mut self, data: Value) -> Self {
        self.parts.push(Part::Data(data));
        self
    }
}

/// A registered A2A handler, type-erased.
pub(crate) trait A2aHandler: Send + Sync + 'static {
    fn call(&self, request: A2aRequest) -> BoxFuture<Result<A2aReply, ToolError>>;
}

impl<F, Fut> A2aHandler for F
where
    F: Fn(A2aRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<A2aReply, ToolError>> + Send + 'static,
{
    fn call(&self, request: A2aRequest) -> BoxFuture<Result<A2aReply, ToolError>> {
        Box::pin(self(request))
    }
}

/// The JSON shapes of one A2A version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// A2A 1.0: ProtoJSON (`TASK_STATE_COMPLETED`, `ROLE_AGENT`, bare parts).
    V1,
    /// A2A 0.3: `kind` discriminators, lowercase states and roles.
    V03,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Completed,
    Failed,
}

/// A task this agent made.
#[derive(Debug, Clone)]
struct TaskRecord {
    id: String,
    context_id: String,
    state: State,
    request: Value,
    request_version: Version,
    reply: Vec<Part>,
    error: Option<String>,
    timestamp: String,
}

/// The tasks an agent keeps, by id (bounded: the oldest go first).
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    tasks: HashMap<String, TaskRecord>,
    order: VecDeque<String>,
}

impl Tasks {
    fn insert(&mut self, task: TaskRecord) {
        if self.tasks.insert(task.id.clone(), task.clone()).is_none() {
            self.order.push_back(task.id);
        }
        while self.order.len() > TASKS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.tasks.remove(&old);
            }
        }
    }
}

/// The A2A side of an agent: its handler and its tasks.
pub(crate) struct A2aServer {
    pub(crate) handler: Arc<dyn A2aHandler>,
    pub(crate) tasks: Mutex<Tasks>,
}

/// JSON-RPC error codes (JSON-RPC 2.0 and A2A).
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const TASK_NOT_FOUND: i64 = -32001;
const TASK_NOT_CANCELABLE: i64 = -32002;

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn rpc_result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl TaskRecord {
    fn render(&self, version: Version) -> Value {
        let agent_message = |parts: Vec<Value>| {
            let mut m = json!({
                "messageId": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("agentmesh:a2a/{}", self.id).as_bytes()).to_string(),
                "contextId": self.context_id,
                "taskId": self.id,
                "parts": parts,
            });
            match version {
                Version::V1 => m["role"] = json!("ROLE_AGENT"),
                Version::V03 => {
                    m["role"] = json!("agent");
                    m["kind"] = json!("message");
                }
            }
            m
        };
        let render_part = |part: &Part| match (part, version) {
            (Part::Text(t), Version::V1) => json!({"text": t}),
            (Part::Text(t), Version::V03) => json!({"kind": "text", "text": t}),
            (Part::Data(d), Version::V1) => json!({"data": d}),
            (Part::Data(d), Version::V03) => json!({"kind": "data", "data": d}),
        };
        let state = match (self.state, version) {
            (State::Completed, Version::V1) => "TASK_STATE_COMPLETED",
            (State::Failed, Version::V1) => "TASK_STATE_FAILED",
            (State::Completed, Version::V03) => "completed",
            (State::Failed, Version::V03) => "failed",
        };
        let mut status = json!({"state": state, "timestamp": self.timestamp});
        let mut history = Vec::new();
        if self.request_version == version {
            history.push(self.request.clone());
        }
        let mut artifacts = Vec::new();
        match &self.error {
            Some(error) => {
                status["message"] = agent_message(vec![render_part(&Part::Text(error.clone()))]);
            }
            None => {
                let parts: Vec<Value> = self.reply.iter().map(render_part).collect();
                artifacts.push(json!({
                    "artifactId": format!("{}-reply", self.id),
                    "name": "reply",
                    "parts": parts.clone(),
                }));
                history.push(agent_message(parts));
            }
        }
        let mut task = json!({
            "id": self.id,
            "contextId": self.context_id,
            "status": status,
            "artifacts": artifacts,
            "history": history,
        });
        if version == Version::V03 {
            task["kind"] = json!("task");
        }
        task
    }
}

impl A2aServer {
    pub(crate) fn new(handler: Arc<dyn A2aHandler>) -> Self {
        Self {
            handler,
            tasks: Mutex::new(Tasks::default()),
        }
    }

    /// The JSON-RPC response to `request`, running the handler for a message.
    async fn respond(&self, agent: &Agent, received: &Received, request: &Value) -> Value {
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        if request.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return rpc_error(&id, INVALID_REQUEST, "not a JSON-RPC 2.0 request");
        }
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let params = request.get("params").cloned().unwrap_or(Value::Null);
        let (version, op) = match method {
            "SendMessage" => (Version::V1, "send"),
            "GetTask" => (Version::V1, "get"),
            "CancelTask" => (Version::V1, "cancel"),
            "message/send" => (Version::V03, "send"),
            "tasks/get" => (Version::V03, "get"),
            "tasks/cancel" => (Version::V03, "cancel"),
            other => {
                return rpc_error(
                    &id,
                    METHOD_NOT_FOUND,
                    &format!("method `{other}` is not served over this binding"),
                );
            }
        };
        match op {
            "send" => {
                let Some(message) = params.get("message").filter(|m| m["parts"].is_array()) else {
                    return rpc_error(
                        &id,
                        INVALID_PARAMS,
                        "`params.message` with `parts` is required",
                    );
                };
                let task = self.run(agent, received, message.clone(), version).await;
                let rendered = task.render(version);
                match version {
                    Version::V1 => rpc_result(&id, json!({"task": rendered})),
                    Version::V03 => rpc_result(&id, rendered),
                }
            }
            _ => {
                let Some(task_id) = params.get("id").and_then(Value::as_str) else {
                    return rpc_error(&id, INVALID_PARAMS, "`params.id` is required");
                };
                let task = self
                    .tasks
                    .lock()
                    .ok()
                    .and_then(|tasks| tasks.tasks.get(task_id).cloned());
                match (task, op) {
                    (None, _) => {
                        rpc_error(&id, TASK_NOT_FOUND, &format!("task `{task_id}` not found"))
                    }
                    (Some(task), "get") => rpc_result(&id, task.render(version)),
                    // Every task ends before its answer leaves: nothing to cancel.
                    (Some(task), _) => rpc_error(
                        &id,
                        TASK_NOT_CANCELABLE,
                        &format!(
                            "task `{}` is {} and cannot be canceled",
                            task.id,
                            match task.state {
                                State::Completed => "completed",
                                State::Failed => "failed",
                            }
                        ),
                    ),
                }
            }
        }
    }

    async fn run(
        &self,
        agent: &Agent,
        received: &Received,
        message: Value,
        version: Version,
    ) -> TaskRecord {
        let task_id = message["taskId"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let context_id = message["contextId"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| received.trace_id());
        let request = A2aRequest {
            agent: agent.clone(),
            received: received.clone(),
            message: message.clone(),
            task_id: task_id.clone(),
            context_id: context_id.clone(),
        };
        let run = std::panic::AssertUnwindSafe(self.handler.call(request));
        let result = futures::FutureExt::catch_unwind(run)
            .await
            .unwrap_or_else(|_| Err(ToolError::new("the A2A handler panicked")));
        let mut stored = message;
        if stored.get("taskId").is_none() {
            stored["taskId"] = json!(task_id);
        }
        if stored.get("contextId").is_none() {
            stored["contextId"] = json!(context_id);
        }
        let (state, reply, error) = match result {
            Ok(reply) => (State::Completed, reply.parts, None),
            Err(e) => (State::Failed, Vec::new(), Some(e.message().to_owned())),
        };
        let task = TaskRecord {
            id: task_id,
            context_id,
            state,
            request: stored,
            request_version: version,
            reply,
            error,
            timestamp: now(),
        };
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.insert(task.clone());
        }
        task
    }
}

impl A2aService for A2aServer {
    /// Answers one A2A request: runs it, publishes the JSON-RPC response
    /// to the caller (`causationid` = the request).
    fn answer(
        self: Arc<Self>,
        agent: Agent,
        received: Received,
    ) -> BoxFuture<Result<(), PublishError>> {
        Box::pin(async move {
            let request: Value = received.json().unwrap_or(Value::Null);
            let response = self.respond(&agent, &received, &request).await;
            Workflow::after(&agent, &received)
                .step(schemas::EventType::Message)
                .target(received.sender().to_string())
                .subject(SUBJECT)
                .data(response)
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: State, error: Option<&str>) -> TaskRecord {
        TaskRecord {
            id: "t1".into(),
            context_id: "c1".into(),
            state,
            request: json!({"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}),
            request_version: Version::V1,
            reply: vec![Part::Text("hello".into()), Part::Data(json!({"n": 1}))],
            error: error.map(str::to_owned),
            timestamp: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn a_completed_task_renders_in_both_versions() {
        let v1 = record(State::Completed, None).render(Version::V1);
        assert_eq!(v1["status"]["state"], "TASK_STATE_COMPLETED");
        assert_eq!(
            v1["artifacts"][0]["parts"],
            json!([{"text": "hello"}, {"data": {"n": 1}}])
        );
        assert_eq!(v1["history"][0]["messageId"], "m1");
        assert_eq!(v1["history"][1]["role"], "ROLE_AGENT");
        assert!(v1.get("kind").is_none());
        let v03 = record(State::Completed, None).render(Version::V03);
        assert_eq!(v03["kind"], "task");
        assert_eq!(v03["status"]["state"], "completed");
        assert_eq!(
            v03["artifacts"][0]["parts"][0],
            json!({"kind": "text", "text": "hello"})
        );
        // The 1.0 request is not shown as 0.3 history.
        assert_eq!(v03["history"].as_array().map(Vec::len), Some(1));
        assert_eq!(v03["history"][0]["role"], "agent");
    }

    #[test]
    fn a_failed_task_says_why_in_its_status() {
        let v1 = record(State::Failed, Some("no such file")).render(Version::V1);
        assert_eq!(v1["status"]["state"], "TASK_STATE_FAILED");
        assert_eq!(v1["status"]["message"]["parts"][0]["text"], "no such file");
        assert_eq!(v1["artifacts"], json!([]));
    }

    #[test]
    fn tasks_are_bounded() {
        let mut tasks = Tasks::default();
        for i in 0..TASKS_KEPT + 5 {
            let mut t = record(State::Completed, None);
            t.id = format!("t{i}");
            tasks.insert(t);
        }
        assert_eq!(tasks.tasks.len(), TASKS_KEPT);
        assert!(!tasks.tasks.contains_key("t0"));
    }
}
