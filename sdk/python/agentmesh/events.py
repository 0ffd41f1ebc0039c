"""CloudEvents 1.0 over NATS, as the mesh speaks them (docs/contract.md):
binary mode (`ce-<name>` headers, percent-encoded as the CloudEvents NATS
binding says) on the way out, binary or structured on the way in; the
W3C `traceparent`; and the checks that make a message a valid mesh event."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import InvalidEvent

TYPE_PREFIX = "io.agentmesh."

#: The catalogue of event types (short names).
TYPES = (
    "prompt",
    "reasoning",
    "action",
    "observation",
    "tool.call",
    "tool.result",
    "memory.update",
    "task.handoff",
    "message",
    "output",
)

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"

_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def valid_agent_id(agent_id: str) -> bool:
    """Whether `agent_id` is one NATS token the mesh accepts as an agent id."""
    return bool(_AGENT_ID.match(agent_id or ""))


def step_token(event_type: str) -> str:
    """The `<step>` token of the ingress subject: the short name with dots as
    underscores (`tool.call` -> `tool_call`)."""
    return short_type(event_type).replace(".", "_")


def short_type(event_type: str) -> str:
    return event_type[len(TYPE_PREFIX):] if event_type.startswith(TYPE_PREFIX) else event_type


def full_type(event_type: str) -> str:
    return event_type if event_type.startswith(TYPE_PREFIX) else TYPE_PREFIX + event_type


def event_key(agent: str, event_id: str) -> str:
    """`Nats-Msg-Id` of an event: `<agent>/<id>` (the mesh's identity of an
    event is its agent and its id)."""
    return f"{agent}/{event_id}"


def new_event_id() -> str:
    """A UUIDv7 (time-ordered), as agents-sdk mints."""
    import time

    ms = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68 & 0xFFF) << 64
    value |= 0x2 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


@dataclass(frozen=True)
class TraceParent:
    """A W3C `traceparent`: the trace id is the workflow, the span id one step."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @staticmethod
    def mint() -> "TraceParent":
        return TraceParent(os.urandom(16).hex(), os.urandom(8).hex())

    @staticmethod
    def parse(text: str) -> "TraceParent":
        m = _TRACEPARENT.match(text.strip())
        if not m or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
            raise ValueError(f"`{text}` is not a W3C traceparent")
        return TraceParent(m.group(2), m.group(3), m.group(4))

    @staticmethod
    def derived(event_id: str) -> "TraceParent":
        """The trace the mesh derives for an event without a `traceparent`
        (as `schemas::TraceParent::derive`: UUIDv5 of the id)."""
        trace = uuid.uuid5(uuid.NAMESPACE_OID, event_id).hex
        span = uuid.uuid5(uuid.NAMESPACE_URL, event_id).hex[:16]
        return TraceParent(trace, span)

    def child(self) -> "TraceParent":
        """The same trace, a new span."""
        return TraceParent(self.trace_id, os.urandom(8).hex(), self.flags)

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def percent_encode(value: str) -> str:
    """Space, `"`, `%` and every byte outside U+0021..U+007E as `%XY`."""
    out = []
    for b in value.encode("utf-8"):
        if 0x21 <= b <= 0x7E and b not in (0x22, 0x25):
            out.append(chr(b))
        else:
            out.append("%%%02X" % b)
    return "".join(out)


def percent_decode(name: str, value: str) -> str:
    value = value.strip(" \t")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    raw = bytearray()
    i = 0
    data = value.encode("utf-8")
    while i < len(data):
        if data[i] == 0x25:
            hexpart = data[i + 1 : i + 3]
            if len(hexpart) != 2 or not re.match(rb"^[0-9a-fA-F]{2}$", bytes(hexpart)):
                raise InvalidEvent(f"header `{name}` is malformed: bad percent-encoding")
            raw.append(int(hexpart, 16))
            i += 3
        else:
            raw.append(data[i])
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEvent(f"header `{name}` is malformed: not UTF-8") from e


@dataclass
class Event:
    """A CloudEvent: its attributes (`id`, `source`, `type`, extensions...)
    and its data (bytes)."""

    attributes: Dict[str, str]
    data: bytes = b""
    #: The NATS headers it came with (Mesh-* among them), when received.
    headers: Dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.attributes.get("id", "")

    @property
    def type(self) -> str:
        return self.attributes.get("type", "")

    @property
    def source(self) -> str:
        return self.attributes.get("source", "")

    def get(self, name: str) -> Optional[str]:
        return self.attributes.get(name)

    def json(self) -> Any:
        """The data parsed as JSON."""
        return json.loads(self.data or b"null")

    def encode_binary(self) -> Tuple[Dict[str, str], bytes]:
        headers = {f"ce-{k}": percent_encode(v) for k, v in self.attributes.items()}
        return headers, self.data


def header(headers: Optional[Mapping[str, str]], name: str) -> Optional[str]:
    """A header by name, whatever its case."""
    if not headers:
        return None
    if name in headers:
        return headers[name]
    lower = name.lower()
    for k, v in headers.items():
        if k.lower() == lower:
            return v
    return None


def decode(headers: Optional[Mapping[str, str]], payload: bytes) -> Event:
    """Decodes a binary- or structured-mode CloudEvent."""
    headers = dict(headers or {})
    content_type = header(headers, "Content-Type") or ""
    if content_type.split(";")[0].strip().lower() == STRUCTURED_CONTENT_TYPE:
        try:
            doc = json.loads(payload)
        except ValueError as e:
            raise InvalidEvent(f"structured payload is not a CloudEvents JSON event: {e}") from e
        if not isinstance(doc, dict):
            raise InvalidEvent("structured payload is not a CloudEvents JSON event")
        attributes: Dict[str, str] = {}
        data = b""
        for k, v in doc.items():
            if k == "data":
                data = json.dumps(v).encode() if not isinstance(v, str) else v.encode()
            elif k == "data_base64":
                import base64

                data = base64.b64decode(v)
            else:
                attributes[k] = v if isinstance(v, str) else json.dumps(v)
        return Event(attributes, data, headers)
    attributes = {}
    for k, v in headers.items():
        if k.lower().startswith("ce-"):
            attributes[k[3:].lower()] = percent_decode(k, v)
    if not attributes:
        raise InvalidEvent("not a CloudEvent: no `ce-*` headers")
    return Event(attributes, payload or b"", headers)


def validate(event: Event, subject_agent: str) -> Event:
    """The mesh's checks on an event from agent `subject_agent`: CloudEvents
    1.0, required attributes, `source` = `/agents/<agent>`, a catalogue type,
    a well-formed `traceparent`, `target` and `causationsource`, a
    `tool.call` with a `subject`."""
    a = event.attributes
    if a.get("specversion") != "1.0":
        raise InvalidEvent(f"specversion `{a.get('specversion')}` is not `1.0`")
    for required in ("id", "source", "type"):
        if not a.get(required):
            raise InvalidEvent(f"missing required attribute `{required}`")
    if a["source"] != f"/agents/{subject_agent}":
        raise InvalidEvent(f"source `{a['source']}` is not `/agents/{subject_agent}`")
    if short_type(a["type"]) not in TYPES or not a["type"].startswith(TYPE_PREFIX):
        raise InvalidEvent(f"type `{a['type']}` is not in the catalogue")
    if "traceparent" in a:
        try:
            TraceParent.parse(a["traceparent"])
        except ValueError as e:
            raise InvalidEvent(str(e)) from e
    if "target" in a and not valid_agent_id(a["target"]):
        raise InvalidEvent(f"target `{a['target']}` is not a valid agent id")
    cs = a.get("causationsource")
    if cs is not None and not (cs.startswith("/agents/") and valid_agent_id(cs[len("/agents/"):])):
        raise InvalidEvent(f"causationsource `{cs}` is not `/agents/<agent>`")
    if a["type"] == TYPE_PREFIX + "tool.call" and not a.get("subject"):
        raise InvalidEvent("a `tool.call` without `subject`")
    return event


def subject_parts(subject: str) -> Tuple[str, str]:
    """(target, source) of `mesh.deliver.<target>.<source>` or
    `mesh.call.<target>.<source>`."""
    for prefix in ("mesh.deliver.", "mesh.call."):
        if subject.startswith(prefix):
            parts = subject[len(prefix):].split(".")
            if len(parts) >= 2 and parts[0] and parts[1]:
                return parts[0], parts[1]
    raise InvalidEvent(f"`{subject}` is not a delivery subject")
