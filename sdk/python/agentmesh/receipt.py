"""The policy worker's decision receipt (`mesh.decision.<agent>`, read from
`MESH_DECISION`), as docs/contract.md describes it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class Receipt:
    """One decision receipt. The fields of the contract are attributes;
    `raw` is the whole JSON object (fields added later are there too)."""

    def __init__(self, raw: Dict[str, Any]):
        self.raw = raw
        self.event_id: str = raw.get("event_id", "")
        self.trace_id: str = raw.get("trace_id", "")
        self.decision: str = raw.get("decision", "")
        self.reasons: List[str] = list(raw.get("reasons") or [])
        self.errors: List[str] = list(raw.get("errors") or [])
        self.policy_hash: str = raw.get("policy_hash", "")
        self.decision_id: str = raw.get("decision_id", "")
        self.agent: str = raw.get("agent", "")
        self.type: str = raw.get("type", "")
        self.target: Optional[str] = raw.get("target")
        self.subject: Optional[str] = raw.get("subject")
        self.causation_id: Optional[str] = raw.get("causation_id")

    @property
    def allowed(self) -> bool:
        """Whether the event was allowed."""
        return self.decision == "allow"

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __repr__(self) -> str:
        return f"Receipt(event_id={self.event_id!r}, decision={self.decision!r}, reasons={self.reasons!r})"
