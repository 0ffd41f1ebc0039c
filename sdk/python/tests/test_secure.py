"""The Python SDK on a broker with authorization on (the default of `meshctl
up`): the planner connects with its own nkey, binds its durables with the
one create its key may send, publishes, reads its receipts from its
durable and gets a denial back as `Denied`."""

import pytest

from agentmesh import Agent, ConnectError, Denied

from conftest import env

pytestmark = pytest.mark.stack("AGENTMESH_SECURE_NATS_URL", "AGENTMESH_PLANNER_SEED_FILE")


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


def test_a_refused_connection_names_the_key_to_pass(run, monkeypatch):
    url = env("AGENTMESH_SECURE_NATS_URL")
    monkeypatch.delenv("AGENTMESH_NKEY_FILE", raising=False)

    async def go():
        with pytest.raises(ConnectError) as refused:
            await Agent("planner").connect(url)
        return str(refused.value)

    message = run(go())
    assert "authorization violation" in message, message
    assert "AGENTMESH_NKEY_FILE=.agentmesh/auth/agents/planner.nk" in message, message
    assert "`meshctl agents add planner`" in message, message


def test_the_key_named_by_agentmesh_nkey_file_is_used(run, monkeypatch):
    url = env("AGENTMESH_SECURE_NATS_URL")
    monkeypatch.setenv("AGENTMESH_NKEY_FILE", env("AGENTMESH_PLANNER_SEED_FILE"))
    # One URL or several, comma-separated: the second is the same broker.
    urls = f"nats://127.0.0.1:1,{url}"

    async def go():
        planner = await Agent("planner").connect(urls)
        try:
            prompt = await planner.workflow().prompt("from the environment's key")
            receipt = await planner.await_decision(prompt.id)
            assert receipt.decision == "allow", receipt
        finally:
            await planner.close()

    run(go())


def test_a_key_file_that_is_not_a_seed_is_named(run, tmp_path):
    url = env("AGENTMESH_SECURE_NATS_URL")
    bad = tmp_path / "planner.nk"
    bad.write_text("SUAM0000\n")

    async def go():
        with pytest.raises(ConnectError) as refused:
            await Agent("planner").connect(url, nkey_seed_file=str(bad))
        return str(refused.value)

    message = run(go())
    assert f"`{bad}` does not hold an nkey user seed" in message, message
    assert ".agentmesh/auth/agents/planner.nk" in message, message
