"""How `Agent.connect` reads its arguments and the environment, without a
broker: the server list (one URL, comma-separated URLs, a list, `NATS_URL`),
the key of `AGENTMESH_NKEY_FILE`, and what a refused connection says."""

import asyncio

import pytest

from agentmesh import Agent, ConnectError
from agentmesh.agent import DEFAULT_NATS_URL, refusal, server_list


def test_one_url_several_or_a_list(monkeypatch):
    monkeypatch.delenv("NATS_URL", raising=False)
    assert server_list("nats://a:4222") == ["nats://a:4222"]
    assert server_list("nats://a:4001, nats://b:4002,nats://c:4003") == ["nats://a:4001", "nats://b:4002", "nats://c:4003"]
    assert server_list(["nats://a:4001", "nats://b:4002,nats://c:4003"]) == ["nats://a:4001", "nats://b:4002", "nats://c:4003"]
    assert server_list(None) == [DEFAULT_NATS_URL]
    monkeypatch.setenv("NATS_URL", "nats://x:1,nats://y:2")
    assert server_list(None) == ["nats://x:1", "nats://y:2"]
    with pytest.raises(ConnectError, match="no NATS URL"):
        server_list(" , ")


def test_a_refusal_names_the_agents_key_and_how_to_get_one():
    text = refusal("coder", "nats://127.0.0.1:4222", None, {})
    assert "refused agent `coder` without credentials (authorization violation)" in text
    assert "AGENTMESH_NKEY_FILE=.agentmesh/auth/agents/coder.nk" in text
    assert "`meshctl agents add coder`" in text
    text = refusal("coder", "nats://127.0.0.1:4222", "/keys/planner.nk", {"nkeys_seed": "/keys/planner.nk"})
    assert "with the nkey in `/keys/planner.nk`" in text


def test_a_missing_key_file_in_the_environment_is_named(monkeypatch, tmp_path):
    missing = tmp_path / "coder.nk"
    monkeypatch.setenv("AGENTMESH_NKEY_FILE", str(missing))
    with pytest.raises(ConnectError) as e:
        asyncio.run(Agent("coder").connect("nats://127.0.0.1:4222"))
    assert f"AGENTMESH_NKEY_FILE=`{missing}` is not a file" in str(e.value)
    assert "meshctl agents add coder" in str(e.value)


def test_an_agent_made_outside_a_loop_connects_in_any_later_loop(monkeypatch):
    # Made before any event loop runs, used by two `asyncio.run`s: nothing
    # of it is bound to a loop until it connects (Python 3.9 bound an
    # `asyncio.Event` made in `__init__` to the loop current at the time).
    monkeypatch.delenv("AGENTMESH_NKEY_FILE", raising=False)
    agent = Agent("planner")
    for _ in range(2):
        with pytest.raises(ConnectError, match="could not connect to NATS at `nats://127.0.0.1:1`"):
            asyncio.run(agent.connect("nats://127.0.0.1:1", reconnect_time_wait=0.01))
        asyncio.run(agent.close())
