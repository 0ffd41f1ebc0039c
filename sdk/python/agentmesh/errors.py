"""Typed errors of the SDK. Every error is an `AgentMeshError`; a caller
branches on the class (`except Denied`, `except TimedOut`), as a Rust caller
branches on `CallErrorKind`."""

from __future__ import annotations

from typing import List, Optional

from .receipt import Receipt


class AgentMeshError(Exception):
    """Any error of the SDK."""


class ConnectError(AgentMeshError):
    """The agent could not be set up (bad id, unreachable broker, missing
    stream or bucket, refused consumer, card not written)."""


class InvalidAgentId(ConnectError, ValueError):
    """An agent id that does not match `[a-z0-9][a-z0-9_-]{0,62}`."""

    def __init__(self, agent_id: str):
        super().__init__(
            f"agent id `{agent_id}` is invalid: it must match `[a-z0-9][a-z0-9_-]{{0,62}}`"
        )
        self.agent_id = agent_id


class MissingStream(ConnectError):
    """A stream or bucket of the mesh is not on the broker."""

    def __init__(self, name: str):
        super().__init__(
            f"`{name}` not found on the broker: start the local stack (`meshctl up`) "
            "or apply the broker config"
        )
        self.name = name


class PublishError(AgentMeshError):
    """A step could not be published (bad data or target, or `MESH_INGRESS`
    did not acknowledge it)."""


class CallError(AgentMeshError):
    """A tool call or a request did not get its answer."""


class Denied(CallError):
    """The mesh refused the call: policy denied it. `receipt.reasons` names
    the determining policies. `Invalid` (the event was invalid) is a kind of
    refusal too, so `except Denied` catches both, as `CallErrorKind::Denied`
    does in Rust."""

    def __init__(self, receipt: Receipt):
        self.receipt = receipt
        super().__init__(describe_denial(receipt))

    @property
    def reasons(self) -> List[str]:
        """The ids of the determining policies."""
        return list(self.receipt.reasons)


class Invalid(Denied):
    """The mesh rejected the event as invalid (`receipt.errors` says why)."""


class NoProvider(CallError):
    """Policy allowed the call but no card in `mesh-agents` lists the tool."""

    def __init__(self, tool: str):
        super().__init__(
            f"no agent serves tool `{tool}`: none lists it in its card in `mesh-agents` "
            "(name one with `on=`)"
        )
        self.tool = tool


class ToolFailed(CallError):
    """The tool's agent answered with an error."""

    def __init__(self, tool: str, message: str):
        super().__init__(f"tool `{tool}` failed: {message}")
        self.tool = tool
        self.message = message


class TimedOut(CallError, TimeoutError):
    """No answer in time. `decision` is the mesh's decision on the call when
    one came (`"allow"`), else None (is the policy worker running?)."""

    def __init__(self, after: float, decision: Optional[str]):
        self.after = after
        self.decision = decision
        if decision == "allow":
            text = f"no answer within {after}s (policy allowed the call)"
        elif decision:
            text = f"no answer within {after}s (decision: {decision})"
        else:
            text = f"no answer and no decision within {after}s: is the policy worker running?"
        super().__init__(text)


class DecisionTimedOut(AgentMeshError, TimeoutError):
    """No receipt for an event in time."""

    def __init__(self, event_id: str, after: float):
        super().__init__(
            f"no decision for event `{event_id}` within {after}s: is the policy worker running?"
        )
        self.event_id = event_id
        self.after = after


class InvalidEvent(AgentMeshError, ValueError):
    """A message that is not a valid mesh event (a delivery is terminated
    once, never retried)."""


class ToolError(Exception):
    """Raise from a tool handler to fail the call with this message; any other
    exception fails it too, with its text."""


def _short(event_type: str) -> str:
    return event_type[len("io.agentmesh."):] if event_type.startswith("io.agentmesh.") else event_type


def describe_denial(receipt: Receipt) -> str:
    what = f"`{_short(receipt.type)}`"
    if receipt.subject:
        what += f" `{receipt.subject}`"
    if receipt.decision == "invalid":
        return f"{what} (event `{receipt.event_id}`) was rejected as invalid: {'; '.join(receipt.errors)}"
    text = f"{what} (event `{receipt.event_id}`) was denied by policy"
    if receipt.reasons:
        text += f" (policies: {', '.join(receipt.reasons)})"
    if receipt.errors:
        text += f" (errors: {'; '.join(receipt.errors)})"
    return text
