"""A2A over NATS, the client side (docs/a2a.md): A2A JSON-RPC requests
(`SendMessage`, `GetTask`, `CancelTask`; the 0.3 names `message/send`,
`tasks/get`, `tasks/cancel` too) sent to an agent of the mesh as
`io.agentmesh.message` events with `subject` `a2a` and the JSON-RPC request
as data, through the policy worker (Cedar decides, the audit records), the
JSON-RPC response coming back the same way with `causationid` = the
request's id."""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional

from .agent import Agent, Workflow
from .errors import AgentMeshError
from .events import full_type

#: The CloudEvents `subject` of A2A requests and responses on the mesh.
A2A_SUBJECT = "a2a"


class A2AError(AgentMeshError):
    """The agent answered with a JSON-RPC error."""

    def __init__(self, error: Dict[str, Any]):
        self.code = error.get("code")
        self.error = error
        super().__init__(f"A2A error {self.code}: {error.get('message', '')}")


def user_message(text: str, *, version: str = "1.0", context_id: Optional[str] = None, task_id: Optional[str] = None) -> Dict[str, Any]:
    """An A2A user `Message` with one text part, in the JSON of `version`."""
    msg: Dict[str, Any] = {"messageId": str(uuid.uuid4())}
    if version == "0.3":
        msg.update(kind="message", role="user", parts=[{"kind": "text", "text": text}])
    else:
        msg.update(role="ROLE_USER", parts=[{"text": text}])
    if context_id:
        msg["contextId"] = context_id
    if task_id:
        msg["taskId"] = task_id
    return msg


class A2AClient:
    """Sends A2A requests to agents of the mesh as agent `agent`."""

    def __init__(self, agent: Agent, workflow: Optional[Workflow] = None):
        self.agent = agent
        self.workflow = workflow or agent.workflow()
        #: The event id of the last request sent (its receipt says what
        #: policy decided).
        self.last_request_id: Optional[str] = None

    async def call(self, target: str, method: str, params: Dict[str, Any], *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Sends one JSON-RPC request to `target` and returns the whole
        JSON-RPC response (raises `Denied` when policy refuses the call,
        `TimedOut` when no answer comes)."""
        request = {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": method, "params": params}
        event, trace = self.workflow.prepare("message", request, target=target, subject=A2A_SUBJECT)
        self.last_request_id = event.id
        answer = await self.agent._exchange(self.workflow, event, trace, full_type("message"), timeout)
        if answer is None:
            raise AgentMeshError("an A2A request without a target got no answer")
        response = answer.json()
        if not isinstance(response, dict) or response.get("jsonrpc") != "2.0":
            raise AgentMeshError(f"the answer of `{target}` is not a JSON-RPC response")
        return response

    async def _result(self, target: str, method: str, params: Dict[str, Any], timeout: Optional[float]) -> Any:
        response = await self.call(target, method, params, timeout=timeout)
        if "error" in response:
            raise A2AError(response["error"])
        return response.get("result")

    async def send_message(self, target: str, message: Dict[str, Any], *, version: str = "1.0", timeout: Optional[float] = None) -> Any:
        """`SendMessage` (`message/send` with `version="0.3"`): the result,
        `{"task": ...}` or `{"message": ...}` in 1.0, a Task or Message in 0.3."""
        method = "message/send" if version == "0.3" else "SendMessage"
        return await self._result(target, method, {"message": message}, timeout)

    async def get_task(self, target: str, task_id: str, *, version: str = "1.0", timeout: Optional[float] = None) -> Any:
        """`GetTask` (`tasks/get`)."""
        method = "tasks/get" if version == "0.3" else "GetTask"
        return await self._result(target, method, {"id": task_id}, timeout)

    async def cancel_task(self, target: str, task_id: str, *, version: str = "1.0", timeout: Optional[float] = None) -> Any:
        """`CancelTask` (`tasks/cancel`)."""
        method = "tasks/cancel" if version == "0.3" else "CancelTask"
        return await self._result(target, method, {"id": task_id}, timeout)


def texts(parts: List[Dict[str, Any]]) -> List[str]:
    """The text of each text part."""
    return [p["text"] for p in parts if "text" in p]
