"""Verify that a delivery was approved by a trusted policy worker, with
nothing but nats-py and PyNaCl (which `pip install nkeys` brings along).

    pip install nats-py nkeys
    python3 verify_delivery.py [--nats-url nats://127.0.0.1:4222]
                               [--subject mesh.deliver.coder.planner] [--seq N]

Reads one delivery from the stream `MESH_DELIVER` (the last one on
`--subject`, or stream sequence `--seq`), rebuilds the bytes the worker
signed (docs/contract.md, "Signed decisions"), looks up `Mesh-Signer` in the
bucket `mesh-signers` and checks `Mesh-Signature` — or, for a decision the
worker signed in a batch (docs/security.md, "Batch signatures"), folds
`Mesh-Batch-Proof` from the decision's leaf up to `Mesh-Batch-Root` and checks
`Mesh-Batch-Signature` over the batch's bytes. Prints `verified <event id>
signed by <key>` and exits 0, or `refused: <why>` and exits 1.

Reading the stream by sequence needs the operator's rights (or a broker
without authorization); an agent verifies the deliveries it pulls from its
own durable the same way.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import urllib.parse
from datetime import datetime

import nats
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

VERSION = "agentmesh.decision.v1"
BATCH_VERSION = "agentmesh.batch.v1"


def netstrings(fields):
    """Each field as a netstring, `<byte length>:<bytes>,`, concatenated."""
    out = b""
    for field in fields:
        raw = field.encode("utf-8")
        out += str(len(raw)).encode() + b":" + raw + b","
    return out


def public_key_bytes(nkey: str) -> bytes:
    """The 32-byte Ed25519 key inside an nkey public key (`N…`): base32 of
    a prefix byte, the key and a CRC-16."""
    raw = base64.b32decode(nkey + "=" * (-len(nkey) % 8))
    return raw[1:33]


def proof_root(leaf: bytes, proof: str):
    """The Merkle root `proof` (`<index>.<size>.<path>`, the path 32-byte
    SHA-256 hashes in unpadded base64url) leads to from `leaf`: RFC 6962
    hashing, RFC 9162 section 2.1.3.2 verification. None if it does not fit.
    Returns (root, size)."""
    index, size, path = proof.split(".", 2)
    fn, sn = int(index), int(size) - 1
    raw = base64.urlsafe_b64decode(path + "=" * (-len(path) % 4))
    r = hashlib.sha256(b"\x00" + leaf).digest()
    for i in range(0, len(raw), 32):
        p = raw[i : i + 32]
        if sn == 0:
            return None, 0
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return (r if sn == 0 and len(raw) % 32 == 0 else None), int(size)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def trusted(record: dict, decided_at: str) -> str:
    """Why a signer record does not trust a decision made at `decided_at`,
    or '' when it does."""
    status = record.get("status")
    if status == "active":
        return ""
    if status == "retired" and when(decided_at) <= when(record.get("retired_at", "")):
        return ""
    return f"signer is {status}"


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--subject", default="mesh.deliver.coder.planner")
    parser.add_argument("--seq", type=int)
    args = parser.parse_args()

    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    if args.seq is not None:
        msg = await js.get_msg("MESH_DELIVER", seq=args.seq)
    else:
        msg = await js.get_msg("MESH_DELIVER", subject=args.subject, direct=False)
    h = msg.headers or {}

    def ce(name: str) -> str:
        return urllib.parse.unquote(h.get("ce-" + name, ""))

    source = ce("source")
    agent = source[len("/agents/"):] if source.startswith("/agents/") else ""
    fields = [
        VERSION,
        h.get("Mesh-Decision-Id", ""),
        agent,
        ce("id"),
        ce("type"),
        ce("target"),
        ce("subject"),
        h.get("Mesh-Decision", ""),
        h.get("Mesh-Policy-Hash", ""),
        h.get("Mesh-Trace-Id", ""),
        hashlib.sha256(msg.data or b"").hexdigest(),
        h.get("Mesh-Decided-At", ""),
    ]
    signer = h.get("Mesh-Signer", "")
    signature = h.get("Mesh-Signature", "")
    batch_signature = h.get("Mesh-Batch-Signature", "")

    why = ""
    if h.get("Mesh-Decision") != "allow":
        why = "not an approved delivery"
    elif not signer or not (signature or batch_signature):
        why = "unsigned"
    else:
        kv = await js.key_value("mesh-signers")
        try:
            record = json.loads((await kv.get(signer)).value)
            why = trusted(record, h.get("Mesh-Decided-At", ""))
        except Exception:  # a key the bucket does not hold
            why = f"signer {signer} is not trusted"
    signed = netstrings(fields)
    if not why and not signature:
        # Signed in a batch: the proof must lead from this decision's leaf
        # (SHA-256 of its signed bytes) to the root the worker signed.
        root = h.get("Mesh-Batch-Root", "")
        try:
            led, size = proof_root(hashlib.sha256(signed).digest(), h.get("Mesh-Batch-Proof", ""))
        except ValueError:
            led, size = None, 0
        if led is None or led.hex() != root:
            why = "inclusion proof does not lead to the signed root"
        else:
            signed = netstrings([BATCH_VERSION, signer, str(size), root])
            signature = batch_signature
    if not why:
        try:
            VerifyKey(public_key_bytes(signer)).verify(
                signed, base64.b64decode(signature)
            )
        except (BadSignatureError, ValueError):
            why = "signature does not match"
    await nc.close()
    if why:
        print(f"refused: {why}")
        return 1
    print(f"verified {ce('id')} signed by {signer}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
