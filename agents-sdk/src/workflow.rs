//! A workflow: one trace (the W3C trace id every step shares), the chain of
//! `causationid`s between its steps, and a builder per step that publishes a
//! binary-mode CloudEvent with `source`, `traceparent` and `causationid` set.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};

use schemas::{EventBuilder, EventBuilderV10, EventType, TraceParent, ext};
use serde::Serialize;
use serde_json::Value;

use crate::error::{PublishError, PublishErrorKind};
use crate::inner::{Agent, BoxFuture, Published};
use crate::payload;
use crate::received::Received;

/// One workflow of an agent: a trace and the steps published in it.
///
/// Each step is a child span of the workflow's trace and, unless told
/// otherwise, follows the step published before it (`causationid`). The
/// first step of a fresh workflow is its root. Clones share the chain.
///
/// ```no_run
/// # async fn demo(agent: agents_sdk::Agent) -> Result<(), Box<dyn std::error::Error>> {
/// let wf = agent.workflow();
/// let prompt = wf.prompt("Summarise the open issues").await?;     // root: no causationid
/// wf.reasoning("Three issues mention the parser").await?;          // follows the prompt
/// wf.action("summarise").with("description", "one line each").await?;
/// wf.memory_update("last_summary", "parser issues").await?;
/// wf.output("1. parser panics on empty input ...").await?;
/// println!("trace {} started with {}", wf.trace_id(), prompt.id);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Workflow {
    pub(crate) agent: Agent,
    trace: TraceParent,
    last: Arc<Mutex<Option<Cause>>>,
    /// The span the next step's span is a child of (OpenTelemetry): the
    /// `traceparent` of the event it follows, none for a fresh workflow.
    parent: Arc<Mutex<Option<TraceParent>>>,
}

/// An event a step follows: its id and, when known, its agent (sent as
/// `causationsource`, so the link stays exact when two agents use one id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cause {
    pub(crate) id: String,
    pub(crate) agent: Option<String>,
}

impl Cause {
    /// An event of `agent`.
    pub(crate) fn of(id: &str, agent: &str) -> Self {
        Self {
            id: id.to_owned(),
            agent: Some(agent.to_owned()),
        }
    }

    /// An event whose agent is not known here.
    pub(crate) fn id(id: String) -> Self {
        Self { id, agent: None }
    }
}

impl std::fmt::Debug for Workflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workflow")
            .field("agent", &self.agent.inner.id)
            .field("trace", &self.trace.to_string())
            .field("last", &self.last_event_id())
            .finish()
    }
}

impl Workflow {
    pub(crate) fn new(
        agent: Agent,
        trace: TraceParent,
        after: Option<Cause>,
        parent: Option<TraceParent>,
    ) -> Self {
        Self {
            agent,
            trace,
            last: Arc::new(Mutex::new(after)),
            parent: Arc::new(Mutex::new(parent)),
        }
    }

    /// The sender's workflow of `received` (a delivery, call or request
    /// to `agent`), continued by `agent`: same trace, and the next step
    /// follows `received`, naming its sender.
    pub(crate) fn after(agent: &Agent, received: &Received) -> Self {
        let trace = received.trace();
        Self::new(
            agent.clone(),
            trace,
            Some(Cause::of(received.id(), received.sender().as_str())),
            Some(trace),
        )
    }

    /// The agent publishing the steps.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The workflow's trace (the parent of every step's span).
    pub fn trace(&self) -> TraceParent {
        self.trace
    }

    /// The trace id, 32 hex characters: what `meshctl trace` takes.
    pub fn trace_id(&self) -> String {
        self.trace.trace_id_hex()
    }

    /// The id of the last step published (or answer received), which the
    /// next step follows.
    pub fn last_event_id(&self) -> Option<String> {
        self.last_cause().map(|c| c.id)
    }

    fn last_cause(&self) -> Option<Cause> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    /// Records `id`, published by `agent` with `traceparent` `span`, as the
    /// event the next step follows.
    pub(crate) fn set_last(&self, id: &str, agent: &str, span: TraceParent) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some(Cause::of(id, agent));
        }
        if let Ok(mut parent) = self.parent.lock() {
            *parent = Some(span);
        }
    }

    fn parent_span(&self) -> Option<TraceParent> {
        self.parent.lock().ok().and_then(|p| *p)
    }

    /// A step of any catalogue type, with an empty JSON object as data.
    pub fn step(&self, event_type: EventType) -> Step {
        Step {
            wf: self.clone(),
            event_type,
            data: Ok(Value::Object(Default::default())),
            target: None,
            subject: None,
            causation: Causation::Follow,
            id: None,
        }
    }

    fn typed(&self, event_type: EventType, data: impl Serialize) -> Step {
        self.step(event_type).data(data)
    }

    /// `io.agentmesh.prompt`: input given to the agent.
    pub fn prompt(&self, text: impl Into<String>) -> Step {
        self.typed(
            EventType::Prompt,
            payload::Prompt {
                text: text.into(),
                role: None,
            },
        )
    }

    /// `io.agentmesh.reasoning`: an intermediate thinking step.
    pub fn reasoning(&self, text: impl Into<String>) -> Step {
        self.typed(
            EventType::Reasoning,
            payload::Reasoning {
                text: text.into(),
                tokens: None,
            },
        )
    }

    /// `io.agentmesh.action`: a decision to act.
    pub fn action(&self, name: impl Into<String>) -> Step {
        self.typed(
            EventType::Action,
            payload::Action {
                name: name.into(),
                description: None,
            },
        )
    }

    /// `io.agentmesh.observation`: what the agent observed.
    pub fn observation(&self, text: impl Into<String>) -> Step {
        self.typed(
            EventType::Observation,
            payload::Observation { text: text.into() },
        )
    }

    /// `io.agentmesh.memory.update`: a change to the agent's memory.
    pub fn memory_update(&self, key: impl Into<String>, value: impl Serialize) -> Step {
        match to_json(value) {
            Ok(value) => self.typed(
                EventType::MemoryUpdate,
                payload::MemoryUpdate {
                    key: key.into(),
                    value,
                },
            ),
            Err(e) => self.step(EventType::MemoryUpdate).invalid(e),
        }
    }

    /// `io.agentmesh.output`: a final result.
    pub fn output(&self, text: impl Into<String>) -> Step {
        self.typed(EventType::Output, payload::Output { text: text.into() })
    }

    /// `io.agentmesh.task.handoff`: hands `task` to agent `target`; the mesh
    /// delivers it if policy allows. Add context with `.with("context", ..)`.
    pub fn handoff(&self, target: impl Into<String>, task: impl Into<String>) -> Step {
        self.typed(
            EventType::TaskHandoff,
            payload::TaskHandoff {
                task: task.into(),
                context: None,
            },
        )
        .target(target)
    }

    /// `io.agentmesh.message`: sends `body` (any JSON) to agent `target`.
    pub fn message(&self, target: impl Into<String>, body: impl Serialize) -> Step {
        match to_json(body) {
            Ok(body) => self
                .typed(EventType::Message, payload::Message { body })
                .target(target),
            Err(e) => self.step(EventType::Message).target(target).invalid(e),
        }
    }
}

/// What a step's `causationid` is.
#[derive(Debug, Clone)]
enum Causation {
    /// The workflow's last event, if any.
    Follow,
    /// This event.
    After(Cause),
    /// None: a root step.
    Root,
}

/// One step to publish; await it (or call [`publish`](Step::publish)) to
/// send it. Until then it can be refined.
///
/// ```no_run
/// # async fn demo(wf: agents_sdk::Workflow) -> Result<(), Box<dyn std::error::Error>> {
/// use agents_sdk::EventType;
/// use serde_json::json;
///
/// // A typed step with an extra field.
/// wf.reasoning("Two options").with("tokens", 512).await?;
/// // Any catalogue type with any JSON data, following an explicit event.
/// let first = wf.observation("build green").await?;
/// wf.step(EventType::Action)
///     .data(json!({"name": "deploy", "env": "staging"}))
///     .caused_by(&first.id)
///     .await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "a step is only published when awaited"]
#[derive(Debug, Clone)]
pub struct Step {
    wf: Workflow,
    event_type: EventType,
    data: Result<Value, String>,
    target: Option<String>,
    subject: Option<String>,
    causation: Causation,
    /// An id chosen by the SDK instead of a fresh UUIDv7.
    id: Option<String>,
}

/// A step made ready to send: its event built, its id minted.
pub(crate) struct Prepared {
    pub(crate) wf: Workflow,
    pub(crate) event: schemas::Event,
    pub(crate) step: String,
    pub(crate) trace: TraceParent,
    /// The span of the event this one follows (OpenTelemetry parent).
    pub(crate) parent: Option<TraceParent>,
    pub(crate) target: Option<String>,
}

impl Step {
    fn invalid(mut self, reason: String) -> Self {
        self.data = Err(reason);
        self
    }

    /// Replaces the data (any JSON-serialisable value).
    pub fn data(mut self, data: impl Serialize) -> Self {
        self.data = to_json(data);
        self
    }

    /// Adds (or replaces) one field of the data object.
    pub fn with(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        self.data = match (self.data, to_json(value)) {
            (Ok(Value::Object(mut map)), Ok(value)) => {
                map.insert(key.into(), value);
                Ok(Value::Object(map))
            }
            (Ok(_), Ok(_)) => Err(format!(
                "cannot add field `{}`: the data is not a JSON object",
                key.into()
            )),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        self
    }

    /// Sets `target`: the mesh routes the event to this agent if policy
    /// allows it.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Sets the CloudEvents `subject` (for a tool call: the tool name).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Makes this step follow event `id` instead of the workflow's last step.
    pub fn caused_by(mut self, id: impl Into<String>) -> Self {
        self.causation = Causation::After(Cause::id(id.into()));
        self
    }

    /// Makes this a root step (no `causationid`).
    pub fn root(mut self) -> Self {
        self.causation = Causation::Root;
        self
    }

    /// Uses `id` as the event id (one the SDK derives, so that publishing
    /// the same report again is deduplicated).
    pub(crate) fn id(mut self, id: String) -> Self {
        self.id = Some(id);
        self
    }

    pub(crate) fn workflow(&self) -> &Workflow {
        &self.wf
    }

    /// The catalogue type of this step.
    pub fn event_type(&self) -> EventType {
        self.event_type
    }

    /// Publishes the step and waits for JetStream's acknowledgement.
    pub async fn publish(self) -> Result<Published, PublishError> {
        self.prepare()?.send().await
    }

    pub(crate) fn prepare(self) -> Result<Prepared, PublishError> {
        let data = self.data.map_err(PublishErrorKind::Data)?;
        if let Some(target) = &self.target
            && !schemas::AgentId::is_valid(target)
        {
            return Err(PublishErrorKind::InvalidTarget(target.clone()).into());
        }
        let id = self.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let trace = self.wf.trace.child();
        let (causation, parent) = match self.causation {
            Causation::Follow => (self.wf.last_cause(), self.wf.parent_span()),
            Causation::After(cause) => (Some(cause), self.wf.parent_span()),
            Causation::Root => (None, None),
        };
        let mut builder = EventBuilderV10::new()
            .id(id)
            .source(self.wf.agent.inner.id.source())
            .ty(self.event_type.as_str())
            .time(chrono::Utc::now())
            .extension(ext::TRACEPARENT, trace.to_string())
            .data("application/json", data);
        if let Some(cause) = causation {
            builder = builder.extension(ext::CAUSATIONID, cause.id);
            if let Some(agent) = cause.agent {
                builder = builder.extension(ext::CAUSATIONSOURCE, format!("/agents/{agent}"));
            }
        }
        if let Some(target) = &self.target {
            builder = builder.extension(ext::TARGET, target.clone());
        }
        if let Some(subject) = self.subject {
            builder = builder.subject(subject);
        }
        let event = builder
            .build()
            .map_err(|e| PublishError::with_source(PublishErrorKind::Build, e))?;
        Ok(Prepared {
            step: step_token(self.event_type),
            wf: self.wf,
            event,
            trace,
            parent,
            target: self.target,
        })
    }
}

impl Prepared {
    pub(crate) fn id(&self) -> &str {
        schemas::AttributesReader::id(&self.event)
    }

    pub(crate) async fn send(self) -> Result<Published, PublishError> {
        let published = self
            .wf
            .agent
            .inner
            .publish_event(&self.step, &self.event, self.trace, self.parent)
            .await?;
        self.wf
            .set_last(&published.id, self.wf.agent.inner.id.as_str(), self.trace);
        Ok(published)
    }
}

impl IntoFuture for Step {
    type Output = Result<Published, PublishError>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.publish())
    }
}

/// The JSON value of `data`, or why it could not be made.
pub(crate) fn to_json(data: impl Serialize) -> Result<Value, String> {
    serde_json::to_value(data).map_err(|e| e.to_string())
}

/// The `<step>` token of the ingress subject for a type: its short name with
/// dots as underscores (`tool.call` → `tool_call`).
pub fn step_token(event_type: EventType) -> String {
    event_type.short_name().replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_tokens_are_single_subject_tokens() {
        assert_eq!(step_token(EventType::ToolCall), "tool_call");
        assert_eq!(step_token(EventType::MemoryUpdate), "memory_update");
        assert_eq!(step_token(EventType::Prompt), "prompt");
        for t in EventType::ALL {
            assert!(!step_token(t).contains('.'));
        }
    }
}
