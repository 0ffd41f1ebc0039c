"""A2A over NATS (docs/a2a.md): a Python A2A client sends A2A JSON-RPC
requests through the mesh to the Rust `coder` (agents-sdk, `.a2a(..)`),
every payload checked against the official `a2a-sdk` types: A2A 1.0
(`SendMessage`, `GetTask`, `CancelTask`, ProtoJSON) and 0.3
(`message/send`, `tasks/get`, `tasks/cancel`)."""

import uuid

import pytest

# The official types need a2a-sdk (Python 3.10 and later; not on 3.9).
a2a1 = pytest.importorskip("a2a.types", reason="the A2A tests check payloads against a2a-sdk, which needs Python 3.10+")
a2a03 = pytest.importorskip("a2a.compat.v0_3.types")
json_format = pytest.importorskip("google.protobuf.json_format")

from agentmesh import A2AClient, A2AError, Agent, Denied

pytestmark = pytest.mark.stack()


def proto(message_type, doc, ignore_unknown=False):
    """`doc` parsed strictly into the a2a-sdk protobuf type."""
    return json_format.ParseDict(doc, message_type(), ignore_unknown_fields=ignore_unknown)


def test_the_coders_card_is_an_a2a_agent_card_naming_the_binding(nats_url, run):
    async def go():
        planner = await Agent("planner").connect(nats_url)
        try:
            cards = await planner.directory.find_a2a()
            assert [c.id for c in cards] == ["coder"]
            raw = cards[0].raw
            # The mesh's own fields (`id`, `tools`) aside, it is an A2A AgentCard.
            card = proto(a2a1.AgentCard, {k: v for k, v in raw.items() if k not in ("id", "tools")})
            assert card.name == "coder"
            assert card.description == "Searches the code"
            assert card.version
            assert [s.id for s in card.skills] == ["rust"]
            assert list(card.default_input_modes) and list(card.default_output_modes)
            assert card.capabilities.streaming is False
            (interface,) = card.supported_interfaces
            assert interface.protocol_binding == "AGENTMESH+NATS"
            assert interface.url == "urn:agentmesh:agent:coder"
            assert interface.protocol_version == "1.0"
        finally:
            await planner.close()

    run(go())


def test_send_get_and_cancel_in_a2a_1_0(nats_url, run):
    async def go():
        planner = await Agent("planner").connect(nats_url)
        try:
            client = A2AClient(planner)
            message = a2a1.Message(message_id=str(uuid.uuid4()), role=a2a1.Role.ROLE_USER, parts=[a2a1.Part(text="find the needle")])
            params = json_format.MessageToDict(a2a1.SendMessageRequest(message=message))
            response = await client.call("coder", "SendMessage", params)
            assert response["jsonrpc"] == "2.0" and "error" not in response, response
            sent = proto(a2a1.SendMessageResponse, response["result"])
            task = sent.task
            assert a2a1.TaskState.Name(task.status.state) == "TASK_STATE_COMPLETED"
            (artifact,) = task.artifacts
            assert [p.text for p in artifact.parts] == ["coder found: find the needle"]
            assert task.history[0].message_id == message.message_id
            assert task.history[-1].role == a2a1.Role.ROLE_AGENT
            # Cedar decided on the request, as on any message.
            receipt = await planner.await_decision(client.last_request_id)
            assert receipt.decision == "allow" and receipt.reasons == ["members-message-members"], receipt

            got = await client.get_task("coder", task.id)
            assert proto(a2a1.Task, got).status.state == a2a1.TaskState.TASK_STATE_COMPLETED
            assert proto(a2a1.Task, got).id == task.id
            with pytest.raises(A2AError) as not_cancelable:
                await client.cancel_task("coder", task.id)
            assert not_cancelable.value.code == -32002  # TaskNotCancelableError
            with pytest.raises(A2AError) as not_found:
                await client.get_task("coder", "no-such-task")
            assert not_found.value.code == -32001  # TaskNotFoundError
            unknown = await client.call("coder", "SendStreamingMessage", params)
            assert unknown["error"]["code"] == -32601  # MethodNotFoundError
        finally:
            await planner.close()

    run(go())


def test_send_get_and_cancel_in_a2a_0_3(nats_url, run):
    async def go():
        planner = await Agent("planner").connect(nats_url)
        try:
            client = A2AClient(planner)
            message = a2a03.Message(
                message_id=str(uuid.uuid4()),
                role=a2a03.Role.user,
                parts=[a2a03.Part(root=a2a03.TextPart(text="find the needle"))],
            )
            request = a2a03.SendMessageRequest(id="1", params=a2a03.MessageSendParams(message=message))
            params = request.model_dump(mode="json", by_alias=True, exclude_none=True)["params"]
            response = await client.call("coder", "message/send", params)
            parsed = a2a03.SendMessageResponse.model_validate(response)
            task = parsed.root.result
            assert isinstance(task, a2a03.Task), task
            assert task.status.state == a2a03.TaskState.completed
            assert [p.root.text for p in task.artifacts[0].parts] == ["coder found: find the needle"]
            got = a2a03.Task.model_validate(await client.get_task("coder", task.id, version="0.3"))
            assert got.status.state == a2a03.TaskState.completed
            with pytest.raises(A2AError) as not_cancelable:
                await client.cancel_task("coder", task.id, version="0.3")
            assert not_cancelable.value.code == -32002
        finally:
            await planner.close()

    run(go())


def test_a_failing_handler_makes_a_failed_task(nats_url, run):
    async def go():
        planner = await Agent("planner").connect(nats_url)
        try:
            client = A2AClient(planner)
            message = a2a1.Message(message_id=str(uuid.uuid4()), role=a2a1.Role.ROLE_USER, parts=[a2a1.Part(text="")])
            result = await client.send_message("coder", json_format.MessageToDict(message))
            task = proto(a2a1.SendMessageResponse, result).task
            assert task.status.state == a2a1.TaskState.TASK_STATE_FAILED
            assert task.status.message.parts[0].text == "an empty message"
        finally:
            await planner.close()

    run(go())


def test_an_unregistered_agent_is_denied_before_the_coder_sees_it(nats_url, run):
    async def go():
        stranger = await Agent("stranger").connect(nats_url)
        try:
            client = A2AClient(stranger)
            message = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": [{"text": "hi"}]}
            with pytest.raises(Denied) as denied:
                await client.send_message("coder", message, timeout=20)
            assert denied.value.reasons == ["unregistered-agent"]
        finally:
            await stranger.close()

    run(go())
