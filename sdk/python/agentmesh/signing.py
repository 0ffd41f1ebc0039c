"""Signed decisions (docs/contract.md, "Signed decisions"): every policy
worker signs each decision with its Ed25519 key; a delivery carries the
signature (`Mesh-Signer`, `Mesh-Signature`) over the event's attributes,
the decision's `Mesh-*` headers and the SHA-256 of the payload. The agent
checks it against the trusted signers in the `mesh-signers` bucket before
any handler sees the event, as agents-sdk does.

A worker under load signs decisions in batches (docs/security.md, "Batch
signatures"): the delivery then carries, instead of `Mesh-Signature`, the
batch's Merkle root (`Mesh-Batch-Root`), the decision's inclusion proof
(`Mesh-Batch-Proof`) and the root's signature (`Mesh-Batch-Signature`);
verified roots are remembered, so one batch costs one Ed25519 check."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
from typing import Dict, Mapping, Optional

import nacl.exceptions
import nacl.signing

from .events import Event, header

log = logging.getLogger("agentmesh")

BUCKET = "mesh-signers"
SIGNED_BYTES_VERSION = "agentmesh.decision.v1"
BATCH_BYTES_VERSION = "agentmesh.batch.v1"
_PREFIX_SERVER = 13 << 3  # nkeys: public keys starting with `N`


class Refused(Exception):
    """Why a signed decision is not trusted; `label` as agents-sdk counts it:
    `unsigned`, `not_allowed`, `untrusted`, `revoked`, `retired`,
    `bad_signature`, `bad_proof`."""

    def __init__(self, label: str, message: str):
        super().__init__(message)
        self.label = label


def netstrings(*fields: str) -> bytes:
    """`<byte length>:<bytes>,` for each field, concatenated."""
    out = bytearray()
    for value in fields:
        data = value.encode("utf-8")
        out += str(len(data)).encode() + b":" + data + b","
    return bytes(out)


def signed_bytes(
    *,
    decision_id: str,
    agent: str,
    event_id: str,
    event_type: str,
    target: str,
    subject: str,
    decision: str,
    policy_hash: str,
    trace_id: str,
    data_sha256: str,
    decided_at: str,
) -> bytes:
    """The exact bytes a decision signature covers."""
    return netstrings(
        SIGNED_BYTES_VERSION,
        decision_id,
        agent,
        event_id,
        event_type,
        target,
        subject,
        decision,
        policy_hash,
        trace_id,
        data_sha256,
        decided_at,
    )


def batch_bytes(signer: str, size: int, root: str) -> bytes:
    """The exact bytes a batch signature covers."""
    return netstrings(BATCH_BYTES_VERSION, signer, str(size), root)


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def decode_proof(text: str):
    """`<index>.<size>.<path>` (path: 32-byte hashes, unpadded base64url) as
    (index, size, [hashes]); raises `Refused` when malformed."""
    try:
        index, size, path = text.strip().split(".", 2)
        if not (index.isdigit() and size.isdigit()):
            raise ValueError("index and size are decimal")
        raw = base64.urlsafe_b64decode(path + "=" * (-len(path) % 4))
        if len(raw) % 32 or int(index) >= int(size):
            raise ValueError("not whole hashes, or index not below size")
    except (ValueError, TypeError) as e:
        raise Refused("bad_proof", f"not an inclusion proof: {e}") from e
    return int(index), int(size), [raw[i : i + 32] for i in range(0, len(raw), 32)]


def proof_root(leaf: bytes, index: int, size: int, path) -> Optional[bytes]:
    """The Merkle root an inclusion proof leads to from the leaf whose data is
    `leaf` (RFC 9162 section 2.1.3.2), or None when it does not fit."""
    if index >= size:
        return None
    fn, sn, r = index, size - 1, _leaf_hash(leaf)
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def public_key_bytes(signer: str) -> bytes:
    """The Ed25519 key of an nkey public key (`N…`)."""
    try:
        raw = base64.b32decode(signer + "=" * (-len(signer) % 8))
    except (ValueError, TypeError) as e:
        raise Refused("untrusted", f"`{signer}` is not an nkey public key") from e
    if len(raw) != 35 or raw[0] != _PREFIX_SERVER or int.from_bytes(raw[33:], "little") != _crc16(raw[:33]):
        raise Refused("untrusted", f"`{signer}` is not an nkey public key")
    return raw[1:33]


def verify_signature(signer: str, data: bytes, signature: str) -> None:
    """Raises `Refused` unless `signature` (standard base64) is `signer`'s
    Ed25519 signature of `data`."""
    key = public_key_bytes(signer)
    try:
        nacl.signing.VerifyKey(key).verify(data, base64.b64decode(signature.strip(), validate=True))
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
        raise Refused("bad_signature", "signature does not match (data, headers or attributes altered)") from e


def _time(text: str) -> Optional[datetime.datetime]:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None


def trusts(record: Mapping[str, str], signed_at: str) -> None:
    """A signer record's verdict on a signature made at `signed_at`: an
    `active` signer is trusted, a `retired` one for what it signed up to
    `retired_at`, a `revoked` one never."""
    status = record.get("status")
    key = record.get("public_key", "")
    if status == "active":
        return
    if status == "retired":
        signed, retired = _time(signed_at), _time(record.get("retired_at", ""))
        if signed is not None and retired is not None and signed <= retired:
            return
        raise Refused("retired", f"signer `{key}` was retired at {record.get('retired_at')}, before this decision")
    raise Refused("revoked", f"signer `{key}` is revoked")


class Trust:
    """The trusted signers of `mesh-signers`, read when the agent connects and
    again (at most every half second) when an unknown signer shows up."""

    def __init__(self, js, kv):
        self._js = js
        self._kv = kv
        self.records: Dict[str, Dict[str, str]] = {}
        self._last_read = 0.0
        # Batch roots whose signature verified: (signer, root, signature).
        self.verified_roots: set = set()

    @staticmethod
    async def open(js) -> Optional["Trust"]:
        """The signers, or None when the mesh has no `mesh-signers` bucket."""
        # Asked by subject first: an agent may always ask which stream holds
        # a subject, so a mesh without the bucket (or whose grants predate
        # it) answers at once instead of timing out.
        try:
            if await js.find_stream_name_by_subject(f"$KV.{BUCKET}.any") != f"KV_{BUCKET}":
                return None
            kv = await js.key_value(BUCKET)
        except Exception:
            return None
        trust = Trust(js, kv)
        await trust.reread(force=True)
        return trust

    async def reread(self, force: bool = False) -> None:
        import asyncio

        if self._kv is None:
            return
        now = asyncio.get_running_loop().time()
        if not force and now - self._last_read < 0.5:
            return
        self._last_read = now
        prefix = f"$KV.{BUCKET}."
        try:
            info = await self._js.stream_info(f"KV_{BUCKET}", subjects_filter=f"{prefix}>")
            keys = [s[len(prefix):] for s in (info.state.subjects or {}) if s.startswith(prefix)]
            records = {}
            for key in keys:
                try:
                    entry = await self._kv.get(key)
                except Exception:
                    continue
                if entry is not None and entry.value:
                    record = json.loads(entry.value)
                    records[record.get("public_key", key)] = record
            self.records = records
        except Exception as e:
            log.warning("reading the trusted signers failed; keeping the last set: %s", e)

    def check(self, event: Event, agent: str, headers: Optional[Mapping[str, str]], payload: bytes) -> None:
        def need(name: str) -> str:
            value = header(headers, name)
            if value is None:
                raise Refused("unsigned", f"unsigned: `{name}` missing")
            return value

        decision = need("Mesh-Decision")
        if decision != "allow":
            raise Refused("not_allowed", f"decision `{decision}` is not `allow`")
        data = signed_bytes(
            decision_id=need("Mesh-Decision-Id"),
            agent=agent,
            event_id=event.id,
            event_type=event.type,
            target=event.get("target") or "",
            subject=event.get("subject") or "",
            decision=decision,
            policy_hash=need("Mesh-Policy-Hash"),
            trace_id=need("Mesh-Trace-Id"),
            data_sha256=hashlib.sha256(payload).hexdigest(),
            decided_at=need("Mesh-Decided-At"),
        )
        signer = need("Mesh-Signer")
        signature = header(headers, "Mesh-Signature")
        batch_signature = header(headers, "Mesh-Batch-Signature")
        if signature is None and batch_signature is None:
            need("Mesh-Signature")
        record = self.records.get(signer)
        if record is None:
            raise Refused("untrusted", f"signer `{signer}` is not trusted")
        trusts(record, need("Mesh-Decided-At"))
        if signature is not None:
            verify_signature(signer, data, signature)
            return
        root = need("Mesh-Batch-Root")
        index, size, path = decode_proof(need("Mesh-Batch-Proof"))
        led = proof_root(hashlib.sha256(data).digest(), index, size, path)
        if led is None or led.hex() != root:
            raise Refused(
                "bad_proof",
                "inclusion proof does not lead to the signed batch root (data, headers, attributes or proof altered)",
            )
        key = (signer, root, batch_signature)
        if key in self.verified_roots:
            return
        verify_signature(signer, batch_bytes(signer, size, root), batch_signature)
        if len(self.verified_roots) >= 4096:
            self.verified_roots.clear()
        self.verified_roots.add(key)

    async def verify(self, event: Event, agent: str, headers: Optional[Mapping[str, str]], payload: bytes) -> None:
        """Raises `Refused` unless the delivery carries a valid signature by a
        trusted signer; an unknown signer is looked up once more."""
        try:
            self.check(event, agent, headers, payload)
        except Refused as e:
            if e.label != "untrusted":
                raise
            await self.reread()
            self.check(event, agent, headers, payload)
