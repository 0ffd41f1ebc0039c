"""OpenTelemetry spans per step, exported over OTLP/HTTP when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set and the `otel` extra is installed
(`pip install './sdk/python[otel]'`); otherwise every helper here does
nothing.

A step's span *is* the span its event's `traceparent` names: same trace id
(the workflow), same span id. Its parent is the span of the event it
follows (the agent's previous step, or the delivery or call it answers),
none for a workflow's first step. The policy worker's `policy.decision`
span is a child of the event's `traceparent`, so a trace backend shows
planner step -> worker decision, and the coder's steps under the planner's,
as one tree. Attributes follow the OpenTelemetry GenAI conventions where
they apply (`gen_ai.operation.name`, `gen_ai.agent.name`,
`gen_ai.tool.name`, `gen_ai.tool.call.id`)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Optional

log = logging.getLogger("agentmesh.telemetry")

_tracer = None
_provider = None
_next_ids: contextvars.ContextVar = contextvars.ContextVar("agentmesh_next_ids", default=None)

# gen_ai.operation.name of each step type.
_OPERATIONS = {
    "tool.call": "execute_tool",
    "tool.result": "execute_tool",
    "task.handoff": "invoke_agent",
    "message": "invoke_agent",
    "prompt": "invoke_agent",
}


def enabled() -> bool:
    return _tracer is not None


def setup(agent_id: str) -> None:
    """Starts the exporter once per process, when asked for by the
    environment and installed."""
    global _tracer, _provider
    if _tracer is not None or not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk is not installed: pip install 'agentmesh[otel]'")
        return

    class StepIds(RandomIdGenerator):
        """Ids of the event being published, where one is set."""

        def generate_span_id(self) -> int:
            ids = _next_ids.get()
            return int(ids[1], 16) if ids else super().generate_span_id()

        def generate_trace_id(self) -> int:
            ids = _next_ids.get()
            return int(ids[0], 16) if ids else super().generate_trace_id()

    service = os.environ.get("OTEL_SERVICE_NAME") or f"agentmesh-agent-{agent_id}"
    _provider = TracerProvider(resource=Resource.create({"service.name": service}), id_generator=StepIds())
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("agentmesh")


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def _parent_context(parent: Optional[Any]):
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    if parent is None:
        return trace.set_span_in_context(trace.INVALID_SPAN)
    ctx = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), True, TraceFlags(1))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


@contextlib.contextmanager
def step_span(agent_id: str, event, trace, parent=None):
    """The span of one published step: ids from the event's `traceparent`,
    parent the step it follows (`parent`, a TraceParent), or none."""
    if _tracer is None:
        yield None
        return
    from .events import short_type

    short = short_type(event.type)
    attributes = {
        "gen_ai.operation.name": _OPERATIONS.get(short, "invoke_agent"),
        "gen_ai.agent.name": agent_id,
        "gen_ai.agent.id": agent_id,
        "agentmesh.event.id": event.id,
        "agentmesh.event.type": event.type,
        "messaging.system": "nats",
    }
    if short in ("tool.call", "tool.result") and event.get("subject"):
        attributes["gen_ai.tool.name"] = event.get("subject")
        attributes["gen_ai.tool.call.id"] = event.get("causationid") if short == "tool.result" else event.id
    if event.get("target"):
        attributes["agentmesh.target"] = event.get("target")
    token = _next_ids.set((trace.trace_id, trace.span_id))
    try:
        span = _tracer.start_span(f"{short} {agent_id}", context=_parent_context(parent), attributes=attributes)
    finally:
        _next_ids.reset(token)
    try:
        yield span
    finally:
        span.end()


@contextlib.contextmanager
def tool_span(agent_id: str, call):
    """Kept for symmetry with `handler_span`: a tool handler's own work is
    covered by the `tool.result` step's span."""
    yield None


@contextlib.contextmanager
def handler_span(agent_id: str, delivery):
    yield None
