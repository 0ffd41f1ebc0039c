"""The Python SDK on a broker with authorization on (the default of `meshctl
up`): the planner connects with its own nkey, binds its durables with the
one create its key may send, publishes, reads its receipts from its
durable and gets a denial back as `Denied`."""

import pytest

from agentmesh import Agent, ConnectError, Denied

from conftest import env


def test_the_planner_connects_with_its_nkey_and_reads_its_receipts(run):
    url = env("AGENTMESH_SECURE_NATS_URL")
    seed_file = env("AGENTMESH_PLANNER_SEED_FILE")

    async def go():
        planner = await Agent("planner").connect(url, nkey_seed_file=seed_file)
        try:
            wf = planner.workflow()
            handoff = await wf.handoff("coder", "write the parser")
            receipt = await planner.await_decision(handoff.id)
            assert receipt.decision == "allow", receipt
            assert receipt.reasons == ["orchestrators-hand-off"], receipt
            with pytest.raises(Denied) as denied:
                await wf.call_tool("shell.exec", {"cmd": "make"}, on="coder", timeout=20)
            assert "forbid-shell-exec" in denied.value.reasons
        finally:
            await planner.close()
        # The planner's key is not the coder's.
        with pytest.raises(ConnectError):
            coder = Agent("coder")
            await coder.connect(url, nkey_seed_file=seed_file, max_reconnect_attempts=0)
            await coder.close()

    run(go())
