"""Signed decisions (docs/contract.md): the Python SDK verifies each
delivery's decision signature against the trusted signers in
`mesh-signers` before any handler sees it. The deliveries here were signed
by the Rust side (`schemas::signing`) in `tests/tests/it/python_sdk.rs`: one
good, one whose payload was altered after signing, one unsigned, one signed
by a key that is not in the bucket; and four signed in one batch (a Merkle
root signed once, an inclusion proof each): two good, one whose payload was
altered, one carrying another decision's proof."""

import asyncio
import hashlib

import pytest

from agentmesh import Agent
from agentmesh.signing import Refused, batch_bytes, decode_proof, proof_root, signed_bytes, trusts, verify_signature

from conftest import env


def test_the_signed_bytes_are_the_contracts():
    # The example of docs/contract.md, "Signed decisions".
    assert signed_bytes(
        decision_id="d-1",
        agent="planner",
        event_id="e-1",
        event_type="io.agentmesh.task.handoff",
        target="coder",
        subject="",
        decision="allow",
        policy_hash="abc",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        data_sha256=hashlib.sha256(b"{}").hexdigest(),
        decided_at="2026-01-02T03:04:05.000006Z",
    ) == (
        b"21:agentmesh.decision.v1,3:d-1,7:planner,3:e-1,25:io.agentmesh.task.handoff,5:coder,0:,"
        b"5:allow,3:abc,32:4bf92f3577b34da6a3ce929d0e0e4736,"
        b"64:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a,27:2026-01-02T03:04:05.000006Z,"
    )
    with pytest.raises(Refused) as bad:
        verify_signature("NOTAKEY", b"x", "AAAA")
    assert bad.value.label == "untrusted"


def test_batch_bytes_and_rfc_6962_proofs():
    assert batch_bytes("NABC", 3, "00ff") == b"18:agentmesh.batch.v1,4:NABC,1:3,4:00ff,"
    # RFC 6962 reference vector: the tree of the leaves "" and 0x00.
    root = "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"
    sibling = hashlib.sha256(b"\x00\x00").digest()
    assert proof_root(b"", 0, 2, [sibling]).hex() == root
    assert proof_root(b"x", 0, 2, [sibling]).hex() != root
    assert proof_root(b"", 0, 2, []) is None
    assert decode_proof("0.1.") == (0, 1, [])
    for bad in ["", "1.1.", "a.2.", "0.2.AAAA"]:
        with pytest.raises(Refused) as refused:
            decode_proof(bad)
        assert refused.value.label == "bad_proof"


def test_retired_and_revoked_signers():
    retired = {"public_key": "N1", "status": "retired", "retired_at": "2026-01-02T00:00:00Z"}
    trusts(retired, "2026-01-01T23:59:59.000001Z")
    with pytest.raises(Refused) as late:
        trusts(retired, "2026-01-02T00:00:00.000001Z")
    assert late.value.label == "retired"
    with pytest.raises(Refused) as revoked:
        trusts({"public_key": "N2", "status": "revoked"}, "2026-01-01T00:00:00Z")
    assert revoked.value.label == "revoked"


@pytest.mark.stack("AGENTMESH_SIGNED_NATS_URL", "AGENTMESH_SIGNED_GOOD", "AGENTMESH_SIGNED_REFUSED")
def test_only_the_delivery_signed_by_a_trusted_signer_reaches_the_handler(run):
    url = env("AGENTMESH_SIGNED_NATS_URL")
    good = env("AGENTMESH_SIGNED_GOOD").split(",")
    refused = env("AGENTMESH_SIGNED_REFUSED").split(",")

    async def go():
        reviewer = await Agent("reviewer").connect(url)
        handled = []
        stop = asyncio.Event()
        serving = asyncio.ensure_future(reviewer.serve(lambda d: handled.append(d.id), stop=stop))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not (set(good) <= set(handled) and reviewer.metrics["refused"] >= len(refused)):
                assert loop.time() < deadline, (handled, reviewer.metrics)
                await asyncio.sleep(0.05)
            assert sorted(handled) == sorted(good)
            assert reviewer.metrics["refused"] == len(refused)
        finally:
            stop.set()
            await serving
            await reviewer.close()

    run(go())
