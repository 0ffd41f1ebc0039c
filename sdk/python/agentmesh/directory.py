"""Discovery: agent cards in the `mesh-agents` KV bucket (key = agent id).

A card has the fields of an A2A `AgentCard` (name, description, version,
skills, capabilities, default input/output modes and an interface entry
naming the A2A-over-NATS binding, see docs/a2a.md) plus `id` and the tools
the agent serves. Cards describe; they do not authorise: only the policy
worker decides what an agent may do."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

BUCKET = "mesh-agents"

#: `protocolBinding` of the A2A interface entry of a mesh agent's card.
A2A_PROTOCOL_BINDING = "AGENTMESH+NATS"
#: The A2A protocol version the binding carries.
A2A_PROTOCOL_VERSION = "1.0"


def a2a_url(agent_id: str) -> str:
    """The A2A interface `url` of agent `agent_id` on the mesh."""
    return f"urn:agentmesh:agent:{agent_id}"


@dataclass
class Skill:
    """One skill (A2A `AgentSkill`)."""

    id: str
    name: str
    description: str = ""
    tags: List[str] = field(default_factory=list)
    examples: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"id": self.id, "name": self.name, "description": self.description, "tags": self.tags}
        if self.examples:
            out["examples"] = self.examples
        return out


@dataclass
class ToolSpec:
    """A tool an agent serves, with the JSON Schema of its arguments."""

    name: str
    description: str = ""
    input_schema: Dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.description, "inputSchema": self.input_schema}


@dataclass
class AgentCard:
    """What an agent says about itself."""

    id: str
    name: str = ""
    description: str = ""
    version: str = "0.1.0"
    skills: List[Skill] = field(default_factory=list)
    tools: List[ToolSpec] = field(default_factory=list)
    #: Whether the agent answers A2A requests over the mesh (adds the
    #: interface entry).
    a2a: bool = False
    #: The whole JSON the card was read from (fields this SDK does not know).
    raw: Dict[str, Any] = field(default_factory=dict)

    def serves(self, tool: str) -> bool:
        return any(t.name == tool for t in self.tools)

    def has_skill(self, skill: str) -> bool:
        return any(s.id == skill or skill in s.tags for s in self.skills)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "id": self.id,
            "name": self.name or self.id,
            "description": self.description,
            "version": self.version,
            "skills": [s.to_json() for s in self.skills],
            "tools": [t.to_json() for t in self.tools],
            "capabilities": {"streaming": False, "pushNotifications": False},
            "defaultInputModes": ["text/plain", "application/json"],
            "defaultOutputModes": ["text/plain", "application/json"],
        }
        if self.a2a:
            out["supportedInterfaces"] = [
                {
                    "url": a2a_url(self.id),
                    "protocolBinding": A2A_PROTOCOL_BINDING,
                    "protocolVersion": A2A_PROTOCOL_VERSION,
                }
            ]
        return out

    @staticmethod
    def from_json(doc: Dict[str, Any], key: str = "") -> "AgentCard":
        interfaces = doc.get("supportedInterfaces") or []
        return AgentCard(
            id=doc.get("id") or key,
            name=doc.get("name", ""),
            description=doc.get("description", ""),
            version=doc.get("version", ""),
            skills=[
                Skill(s.get("id", ""), s.get("name", ""), s.get("description", ""), list(s.get("tags") or []), list(s.get("examples") or []))
                for s in doc.get("skills") or []
            ],
            tools=[
                ToolSpec(t.get("name", ""), t.get("description", ""), t.get("inputSchema") or {"type": "object"})
                for t in doc.get("tools") or []
            ],
            a2a=any(i.get("protocolBinding") == A2A_PROTOCOL_BINDING for i in interfaces),
            raw=doc,
        )


class Directory:
    """The `mesh-agents` bucket: register, look up and list cards."""

    def __init__(self, kv, js=None):
        self._kv = kv
        self._js = js

    @staticmethod
    async def open(js) -> "Directory":
        from .errors import MissingStream

        try:
            return Directory(await js.key_value(BUCKET), js)
        except Exception as e:  # nats.js.errors.BucketNotFoundError and kin
            if "not found" in str(e).lower() or type(e).__name__ in ("BucketNotFoundError", "NotFoundError"):
                raise MissingStream(BUCKET) from e
            raise

    async def register(self, card: AgentCard) -> None:
        await self._kv.put(card.id, json.dumps(card.to_json()).encode())

    async def get(self, agent_id: str) -> Optional[AgentCard]:
        try:
            entry = await self._kv.get(agent_id)
        except Exception:
            return None
        if entry is None or not entry.value:
            return None
        return AgentCard.from_json(json.loads(entry.value), agent_id)

    async def list(self) -> List[AgentCard]:
        # The keys are the subjects of the bucket's stream, read from its
        # stream information (an agent on a mesh with authorization may not
        # create the consumer a key listing would).
        prefix = f"$KV.{BUCKET}."
        info = await self._js.stream_info(f"KV_{BUCKET}", subjects_filter=f"{prefix}>")
        keys = [s[len(prefix):] for s in (info.state.subjects or {}) if s.startswith(prefix)]
        cards = []
        for key in sorted(keys):
            card = await self.get(key)
            if card is not None:
                cards.append(card)
        return cards

    async def find_by_tool(self, tool: str) -> List[AgentCard]:
        return [c for c in await self.list() if c.serves(tool)]

    async def find_by_skill(self, skill: str) -> List[AgentCard]:
        return [c for c in await self.list() if c.has_skill(skill)]

    async def find_a2a(self) -> List[AgentCard]:
        """The agents whose cards offer the A2A-over-NATS interface."""
        return [c for c in await self.list() if c.a2a]
