//! The JSON data the SDK puts in each catalogue type (`datacontenttype:
//! application/json`).
//!
//! Any NATS client may send other data; the SDK reads these shapes leniently
//! (see [`Received::json`](crate::Received::json)).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `io.agentmesh.prompt`: input given to an agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Prompt {
    /// The prompt text.
    pub text: String,
    /// Who speaks (`user`, `system`, ...), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// `io.agentmesh.reasoning`: an intermediate thinking step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Reasoning {
    /// The reasoning text.
    pub text: String,
    /// Model tokens spent on this step, when the agent reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
}

/// `io.agentmesh.action`: a decision to act.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Action {
    /// The action's name.
    pub name: String,
    /// What it is meant to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `io.agentmesh.observation`: what an agent observed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Observation {
    /// The observation.
    pub text: String,
}

/// The `subject` of the observation an agent publishes when it gives up on
/// a delivery.
pub const GAVE_UP_SUBJECT: &str = "delivery.gave_up";

/// `io.agentmesh.observation` with subject `delivery.gave_up`: the agent
/// gave up on a delivery after its last attempt and terminated it. Its
/// `causationid` is the delivery's id (and `causationsource` its sender),
/// in the delivery's trace. An [`Observation`] reader sees `text`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeliveryGaveUp {
    /// One line for people: `<agent> gave up on <type> <id> from <source>
    /// after <n> attempts: <error>`.
    pub text: String,
    /// The same, field by field.
    pub gave_up: GaveUp,
}

/// What an agent gave up on (see [`DeliveryGaveUp`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GaveUp {
    /// The delivered event's id.
    pub event_id: String,
    /// The agent that sent it.
    pub source: String,
    /// Its CloudEvents type.
    pub r#type: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error.
    pub error: String,
}

/// `io.agentmesh.tool.call`: a request to call a tool (also named by the
/// event's `subject`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool.
    pub tool: String,
    /// The arguments, a JSON document matching the tool's input schema.
    #[serde(default)]
    pub arguments: Value,
}

/// `io.agentmesh.tool.result`: the answer to a tool call (`causationid` =
/// the call's id).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolResult {
    /// The tool.
    pub tool: String,
    /// Whether the tool succeeded.
    pub ok: bool,
    /// The result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error message when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `io.agentmesh.memory.update`: a change to an agent's memory.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MemoryUpdate {
    /// The memory key.
    pub key: String,
    /// The new value.
    pub value: Value,
}

/// `io.agentmesh.task.handoff`: work handed to the `target` agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskHandoff {
    /// The task.
    pub task: String,
    /// Anything the target needs to do it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
}

/// `io.agentmesh.message`: a free-form message to the `target` agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Message {
    /// The body: any JSON.
    pub body: Value,
}

/// `io.agentmesh.output`: a final result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Output {
    /// The result.
    pub text: String,
}
