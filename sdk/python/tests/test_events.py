"""The SDK's encoding, without a mesh: the same bytes and ids as the Rust
side (`schemas`, agents-sdk) produces for the same input."""

import pytest

from agentmesh import InvalidEvent, TraceParent, report_id
from agentmesh.events import Event, decode, percent_decode, percent_encode, step_token, validate


def test_headers_are_percent_encoded_as_the_nats_binding_says():
    # schemas/src/binding.rs encodes this subject to the same text.
    assert percent_encode('héllo wörld "quoted" 100%') == "h%C3%A9llo%20w%C3%B6rld%20%22quoted%22%20100%25"
    assert percent_encode("/agents/x~!") == "/agents/x~!"
    assert percent_decode("ce-subject", "h%c3%a9llo%20w%C3%B6rld") == "héllo wörld"
    with pytest.raises(InvalidEvent):
        percent_decode("ce-subject", "100%2")


def test_the_give_up_report_id_is_the_one_agents_sdk_derives():
    # agents-sdk's delivery tests assert the same id for the same delivery.
    assert report_id("coder", "planner", "e1") == "ea939efb-5d00-5848-ac0c-a10ddaea060f"
    assert report_id("coder", "planner", "e1") != report_id("coder", "reviewer", "e1")


def test_a_trace_is_derived_as_the_mesh_derives_it():
    assert str(TraceParent.derived("e1")) == "00-19f2bfd82a1a5e2d83d6541a3157afdb-78afd2c10d0b5b8e-01"
    minted = TraceParent.mint()
    child = minted.child()
    assert child.trace_id == minted.trace_id and child.span_id != minted.span_id
    assert TraceParent.parse(str(child)) == child
    with pytest.raises(ValueError):
        TraceParent.parse("00-" + "0" * 32 + "-00f067aa0ba902b7-01")


def test_step_tokens_and_validation():
    assert step_token("io.agentmesh.tool.call") == "tool_call"
    assert step_token("memory.update") == "memory_update"
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "e1",
        "ce-source": "/agents/planner",
        "ce-type": "io.agentmesh.tool.call",
        "ce-subject": "code.search",
        "ce-target": "coder",
    }
    event = validate(decode(headers, b"{}"), "planner")
    assert event.id == "e1" and event.get("subject") == "code.search"
    for broken, why in [
        ({**headers, "ce-source": "/agents/mallory"}, "source"),
        ({**headers, "ce-type": "io.agentmesh.dance"}, "catalogue"),
        ({k: v for k, v in headers.items() if k != "ce-subject"}, "subject"),
        ({**headers, "ce-target": "Not Valid"}, "target"),
        ({**headers, "ce-traceparent": "nope"}, "traceparent"),
    ]:
        with pytest.raises(InvalidEvent, match=why):
            validate(decode(broken, b"{}"), "planner")
    structured = decode(
        {"Content-Type": "application/cloudevents+json"},
        b'{"specversion":"1.0","id":"e2","source":"/agents/planner","type":"io.agentmesh.prompt","data":{"text":"hi"}}',
    )
    assert validate(structured, "planner").json() == {"text": "hi"}
    assert Event({"id": "x"}).encode_binary()[0] == {"ce-id": "x"}
