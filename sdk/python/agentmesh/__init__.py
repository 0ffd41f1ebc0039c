"""agentmesh for Python: write an agent of the mesh.

An `Agent` is a NATS connection under an agent id. It publishes the steps
of a `Workflow` (prompt, reasoning, action, observation, memory update,
output, handoffs, messages, tool calls) as CloudEvents on
`mesh.ingress.<agent>.<step>`; the policy worker decides on each and routes
the approved ones. It serves tools and deliveries from its own durables,
reads its receipts from `MESH_DECISION`, and describes itself with a card in
`mesh-agents`. Same contract as the Rust `agents-sdk` (docs/contract.md)."""

from .a2a import A2AClient, A2AError, user_message
from .agent import (
    Agent,
    Delivery,
    Published,
    Received,
    ToolCall,
    Workflow,
    consumer_name,
    receipts_consumer_name,
    report_id,
)
from .directory import AgentCard, Directory, Skill, ToolSpec
from .errors import (
    AgentMeshError,
    CallError,
    ConnectError,
    DecisionTimedOut,
    Denied,
    Invalid,
    InvalidAgentId,
    InvalidEvent,
    MissingStream,
    NoProvider,
    PublishError,
    TimedOut,
    ToolError,
    ToolFailed,
)
from .events import Event, TraceParent
from .receipt import Receipt

__all__ = [
    "A2AClient",
    "A2AError",
    "Agent",
    "AgentCard",
    "AgentMeshError",
    "CallError",
    "ConnectError",
    "DecisionTimedOut",
    "Delivery",
    "Denied",
    "Directory",
    "Event",
    "Invalid",
    "InvalidAgentId",
    "InvalidEvent",
    "MissingStream",
    "NoProvider",
    "Published",
    "PublishError",
    "Receipt",
    "Received",
    "Skill",
    "TimedOut",
    "ToolCall",
    "ToolError",
    "ToolFailed",
    "ToolSpec",
    "TraceParent",
    "Workflow",
    "consumer_name",
    "receipts_consumer_name",
    "report_id",
    "user_message",
]
