"""The Python SDK against the real mesh (policy worker on the shipped
policies, the Rust `coder` serving `code.search`): steps, receipts, tool
calls both ways, denials, timeouts, invalid events, deliveries, retries and
giving up, and the example planner -> Rust coder pair."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from agentmesh import (
    Agent,
    Denied,
    Invalid,
    InvalidAgentId,
    NoProvider,
    TimedOut,
    ToolError,
    ToolFailed,
    report_id,
)

INGRESS = "MESH_INGRESS"

# Every test here runs against the mesh of `tests/tests/it/python_sdk.rs`.
pytestmark = pytest.mark.stack()

# Made at import, before any event loop: used in two loops below.
MODULE_LEVEL_PLANNER = Agent("planner")


async def stored(js, published):
    """The message of `published` as `MESH_INGRESS` stored it."""
    return await js.get_msg(INGRESS, published.sequence)


async def eventually(what, probe, timeout=20.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_steps_carry_source_trace_causation_and_msg_id(nats_url, run):
    async def go():
        planner = await Agent("planner").connect(nats_url)
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            wf = planner.workflow()
            steps = [
                await wf.prompt("add a parser"),
                await wf.reasoning("two options", tokens=512),
                await wf.action("write", description="the parser"),
                await wf.observation("it compiles"),
                await wf.memory_update("plan", {"steps": 2}),
                await wf.output("done"),
            ]
            types = ["prompt", "reasoning", "action", "observation", "memory.update", "output"]
            previous = None
            for published, ty in zip(steps, types):
                msg = await stored(js, published)
                h = msg.headers
                assert msg.subject == f"mesh.ingress.planner.{ty.replace('.', '_')}"
                assert h["Nats-Msg-Id"] == f"planner/{published.id}"
                assert h["ce-specversion"] == "1.0"
                assert h["ce-id"] == published.id
                assert h["ce-source"] == "/agents/planner"
                assert h["ce-type"] == f"io.agentmesh.{ty}"
                assert h["ce-datacontenttype"] == "application/json"
                tp = h["ce-traceparent"].split("-")
                assert tp[1] == wf.trace_id and tp[2] == published.traceparent.span_id
                if previous is None:
                    assert "ce-causationid" not in h
                else:
                    assert h["ce-causationid"] == previous.id
                    assert h["ce-causationsource"] == "/agents/planner"
                previous = published
            assert json.loads((await stored(js, steps[1])).data) == {"text": "two options", "tokens": 512}
            assert json.loads((await stored(js, steps[4])).data) == {"key": "plan", "value": {"steps": 2}}
            # Receipts are read from MESH_DECISION through receipts-planner.
            for published in steps:
                receipt = await planner.await_decision(published.id)
                assert receipt.decision == "allow", receipt
                assert receipt.trace_id == wf.trace_id
                assert receipt.reasons
            info = await js.consumer_info("MESH_DECISION", "receipts-planner")
            assert info.config.filter_subject == "mesh.decision.planner"
        finally:
            await planner.close()
            await nc.close()

    run(go())


def test_a_tool_of_the_rust_coder_answers_the_python_planner(nats_url, run):
    async def go():
        planner = await Agent("planner").connect(nats_url)
        try:
            wf = planner.workflow()
            await wf.prompt("find the needle")
            found = await wf.call_tool("code.search", {"query": "needle"})
            assert any("needle" in line for line in found["matches"]), found
            # The result is the workflow's last step now: the next follows it.
            assert wf.last_event_id is not None
            result_id = wf.last_event_id
            out = await wf.output("found it")
            nc = await nats.connect(nats_url)
            msg = await nc.jetstream().get_msg(INGRESS, out.sequence)
            assert msg.headers["ce-causationid"] == result_id
            assert msg.headers["ce-causationsource"] == "/agents/coder"
            await nc.close()
            cards = await planner.directory.find_by_tool("code.search")
            assert [c.id for c in cards] == ["coder"]
        finally:
            await planner.close()

    run(go())


def test_denied_timed_out_invalid_and_failed_calls_raise_typed_errors(nats_url, run):
    async def go():
        planner = await Agent("planner", call_timeout=20).connect(nats_url)
        try:
            wf = planner.workflow()
            with pytest.raises(Denied) as denied:
                await wf.call_tool("shell.exec", {"cmd": "rm -rf /"}, on="coder")
            assert not isinstance(denied.value, Invalid)
            assert "forbid-shell-exec" in denied.value.reasons
            assert denied.value.receipt.decision == "deny"
            assert "denied by policy" in str(denied.value)
            # Allowed, but nobody answers `tests.run` for the reviewer.
            with pytest.raises(TimedOut) as timed_out:
                await wf.call_tool("tests.run", {"suite": "all"}, on="reviewer", timeout=2)
            assert timed_out.value.decision == "allow"
            assert isinstance(timed_out.value, TimeoutError)
            # A tool call without a tool name is not a valid event.
            with pytest.raises(Invalid) as invalid:
                await wf.call_tool("", {}, on="coder")
            assert invalid.value.receipt.decision == "invalid"
            assert invalid.value.receipt.errors
            # Allowed, but no card lists the tool.
            with pytest.raises(NoProvider):
                await wf.call_tool("web.search", {"q": "x"})
            # The coder's handler fails.
            with pytest.raises(ToolFailed) as failed:
                await wf.call_tool("code.search", {}, on="coder")
            assert "query" in failed.value.message
        finally:
            await planner.close()

    run(go())
    with pytest.raises(InvalidAgentId):
        Agent("Not An Id")


def test_a_python_agent_serves_a_tool_and_its_deliveries(nats_url, run):
    async def go():
        reviewer = Agent("reviewer", description="Reviews and runs the tests")
        seen = []

        @reviewer.tool("tests.run", description="Runs a test suite")
        async def tests_run(call):
            if call.arguments.get("suite") == "broken":
                raise ToolError("the suite `broken` does not exist")
            await call.workflow().reasoning(f"{call.caller} asked for {call.arg('suite')}")
            return {"suite": call.arg("suite"), "passed": True}

        async def handle(delivery):
            seen.append(delivery)
            if delivery.short_type == "message":
                await delivery.reply({"verdict": "approved", "asked": delivery.json()["body"]})

        await reviewer.connect(nats_url)
        planner = await Agent("planner").connect(nats_url)
        stop = asyncio.Event()
        serving = asyncio.ensure_future(reviewer.serve(handle, stop=stop))
        try:
            wf = planner.workflow()
            result = await wf.call_tool("tests.run", {"suite": "unit"})
            assert result == {"suite": "unit", "passed": True}
            with pytest.raises(ToolFailed) as failed:
                await wf.call_tool("tests.run", {"suite": "broken"})
            assert "does not exist" in failed.value.message
            reply = await wf.request("reviewer", {"diff": "+ fn parse() {}"})
            assert reply.sender == "reviewer"
            assert reply.json()["body"] == {"verdict": "approved", "asked": {"diff": "+ fn parse() {}"}}
            handoff = await wf.handoff("reviewer", "review the parser", context={"pr": 7})
            await eventually("the handoff to reach the handler", lambda: _async(any(d.id == handoff.id for d in seen)))
            got = next(d for d in seen if d.id == handoff.id)
            assert got.sender == "planner" and got.trace_id == wf.trace_id
            assert got.json() == {"task": "review the parser", "context": {"pr": 7}}
            # Answers the request consumed are not handed to a handler.
            assert all(d.short_type != "tool.call" for d in seen)
            # (and the call an earlier test left for the reviewer, if any)
            assert reviewer.metrics["tool_calls"] >= 2
        finally:
            stop.set()
            await serving
            await planner.close()
            await reviewer.close()

    run(go())


async def _async(value):
    return value


def test_a_failing_handler_is_retried_then_given_up_with_a_report(nats_url, run):
    async def go():
        reviewer = Agent("reviewer", max_attempts=2, nak_delay=0.1)
        attempts = []

        def handle(delivery):
            attempts.append(delivery.delivery_count)
            raise ValueError("missing field `diff`")

        await reviewer.connect(nats_url)
        planner = await Agent("planner").connect(nats_url)
        stop = asyncio.Event()
        serving = asyncio.ensure_future(reviewer.serve(handle, stop=stop))
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            handoff = await planner.workflow().handoff("reviewer", "review")
            rid = report_id("reviewer", "planner", handoff.id)

            async def report():
                try:
                    msg = await js.get_last_msg(INGRESS, "mesh.ingress.reviewer.observation")
                except Exception:
                    return None
                return msg if msg.headers.get("ce-id") == rid else None

            msg = await eventually("the give-up report", report)
            assert attempts == [1, 2]
            assert msg.headers["ce-subject"] == "delivery.gave_up"
            assert msg.headers["ce-causationid"] == handoff.id
            assert msg.headers["ce-causationsource"] == "/agents/planner"
            data = json.loads(msg.data)
            assert data["gave_up"] == {
                "event_id": handoff.id,
                "source": "planner",
                "type": "io.agentmesh.task.handoff",
                "attempts": 2,
                "error": "missing field `diff`",
            }
            assert data["text"].startswith(f"reviewer gave up on task.handoff {handoff.id} from planner after 2 attempts")
            assert reviewer.metrics["gave_up"] == 1
        finally:
            stop.set()
            await serving
            await nc.close()
            await planner.close()
            await reviewer.close()

    run(go())


def test_the_example_planner_works_with_the_rust_coder(nats_url):
    script = Path(__file__).resolve().parents[1] / "examples" / "planner.py"
    out = subprocess.run(
        [sys.executable, str(script), "--nats-url", nats_url, "--query", "needle"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(script.parents[1])},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("code.search:") and "needle" in line for line in lines), out.stdout
    assert any(line.startswith("shell.exec denied by") and "forbid-shell-exec" in line for line in lines), out.stdout
    assert any(line.startswith("handoff allow by") for line in lines), out.stdout
    assert any(line.startswith("coder replied:") and "done" in line for line in lines), out.stdout
    assert "prompt allow" in lines, out.stdout


def test_a_call_for_a_tool_the_agent_does_not_serve_fails_at_once(nats_url, run):
    async def go():
        reviewer = await Agent("reviewer").connect(nats_url)
        planner = await Agent("planner").connect(nats_url)
        stop = asyncio.Event()
        serving = asyncio.ensure_future(reviewer.serve(stop=stop))
        try:
            with pytest.raises(ToolFailed) as failed:
                await planner.workflow().call_tool("code.search", {"query": "x"}, on="reviewer", timeout=20)
            assert failed.value.message == "agent `reviewer` does not serve tool `code.search`"
        finally:
            stop.set()
            await serving
            await planner.close()
            await reviewer.close()

    run(go())


def test_an_agent_made_at_import_works_in_each_loop_it_is_connected_in(nats_url):
    async def once(text):
        planner = await MODULE_LEVEL_PLANNER.connect(nats_url)
        try:
            prompt = await planner.workflow().prompt(text)
            receipt = await planner.await_decision(prompt.id)
            assert receipt.decision == "allow", receipt
            # `serve` waits on the agent's own loop-bound objects.
            stop = asyncio.Event()
            serving = asyncio.ensure_future(planner.serve(stop=stop))
            await asyncio.sleep(0)
            stop.set()
            await asyncio.wait_for(serving, 20)
        finally:
            await planner.close()

    for text in ("first loop", "second loop"):
        asyncio.run(asyncio.wait_for(once(text), 60))
