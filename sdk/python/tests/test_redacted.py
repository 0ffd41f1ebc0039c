"""Redacted deliveries (docs/guardrails.md, "Redaction"): an `@redact`
allow delivers a copy with personal data replaced by `[REDACTED:<kind>]`,
`Mesh-Redacted` naming the kinds, and a decision signature over the
redacted payload. The deliveries here came from the real policy worker
(`tests/tests/it/python_sdk.rs`, the shipped policies plus
`examples/policies/redact.cedar`): a JSON message and a plain-text one from
the coder to the reviewer, redacted; and a copy of the JSON one whose data
was put back to the original after signing, which the SDK must refuse."""

import asyncio
import json

import pytest

from agentmesh import Agent

from conftest import env


@pytest.mark.stack("AGENTMESH_REDACTED_NATS_URL", "AGENTMESH_REDACTED_EXPECT", "AGENTMESH_REDACTED_REFUSED")
def test_a_redacted_delivery_verifies_and_an_unredacted_copy_is_refused(run):
    url = env("AGENTMESH_REDACTED_NATS_URL")
    # {event id: [data as delivered, Mesh-Redacted]}
    expect = {k: tuple(v) for k, v in json.loads(env("AGENTMESH_REDACTED_EXPECT")).items()}
    refused = int(env("AGENTMESH_REDACTED_REFUSED"))
    for data, kinds in expect.values():
        assert "[REDACTED:" in data and kinds, expect

    async def go():
        reviewer = await Agent("reviewer").connect(url)
        handled = []
        stop = asyncio.Event()

        def handle(d):
            handled.append((d.id, d.data.decode(), d.headers.get("Mesh-Redacted")))

        serving = asyncio.ensure_future(reviewer.serve(handle, stop=stop))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not (len(handled) >= len(expect) and reviewer.metrics["refused"] >= refused):
                assert loop.time() < deadline, (handled, reviewer.metrics)
                await asyncio.sleep(0.05)
            # Each redacted copy reached the handler once, as delivered;
            # the copy carrying the original data did not.
            assert sorted(handled) == sorted((k, d, r) for k, (d, r) in expect.items())
            assert reviewer.metrics["refused"] == refused
        finally:
            stop.set()
            await serving
            await reviewer.close()

    run(go())
