"""The agent: a NATS connection under an agent id, its durables
(`agent-<id>` on `MESH_DELIVER` and `MESH_CALL`, `receipts-<id>` on
`MESH_DECISION`), its card in `mesh-agents`, its tool handlers, and the one
place events are published to `mesh.ingress.<self>.<step>`.

Same contract and behaviour as the Rust `agents-sdk` (docs/sdk.md): every
step is a binary-mode CloudEvent with `source`, `traceparent`,
`causationid` and `causationsource` set and `Nats-Msg-Id: <agent>/<id>`;
a call listens for its receipt and its answer before it publishes; a
delivery is acknowledged only once handled, retried with backoff when the
handler fails, and given up on (with an audited report) after the last
attempt."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import telemetry
from .directory import AgentCard, Directory, Skill, ToolSpec
from .errors import (
    AgentMeshError,
    ConnectError,
    DecisionTimedOut,
    Denied,
    Invalid,
    InvalidAgentId,
    InvalidEvent,
    MissingStream,
    NoProvider,
    PublishError,
    TimedOut,
    ToolFailed,
)
from .events import (
    Event,
    TraceParent,
    decode,
    event_key,
    full_type,
    header,
    new_event_id,
    short_type,
    step_token,
    subject_parts,
    valid_agent_id,
    validate,
)
from .receipt import Receipt
from .signing import Refused, Trust

log = logging.getLogger("agentmesh")

STREAM_INGRESS = "MESH_INGRESS"
STREAM_DELIVER = "MESH_DELIVER"
STREAM_DECISION = "MESH_DECISION"
STREAM_CALL = "MESH_CALL"

#: `subject` of the report an agent publishes when it gives up on a delivery.
GAVE_UP_SUBJECT = "delivery.gave_up"

DEFAULT_ACK_WAIT = 30.0
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 5

_RECENT = 4096

#: The environment variable naming the agent's nkey seed file.
NKEY_FILE_ENV = "AGENTMESH_NKEY_FILE"
#: The default broker, when neither `url` nor `NATS_URL` names one.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# nats-py options that carry credentials: any of them set, the environment's
# key is not used.
#: How often the first connect tries each server before it gives up.
_CONNECT_TRIES = 3
_CREDENTIAL_OPTIONS = ("nkeys_seed", "nkeys_seed_str", "user_credentials", "user", "token", "signature_cb", "user_jwt_cb")
_FETCH_WAIT = 1.0

ToolHandler = Callable[["ToolCall"], Union[Any, Awaitable[Any]]]
DeliveryHandler = Callable[["Delivery"], Union[None, Awaitable[None]]]


@dataclass(frozen=True)
class Published:
    """What JetStream said about a published step."""

    id: str
    traceparent: TraceParent
    subject: str
    sequence: int
    duplicate: bool

    @property
    def trace_id(self) -> str:
        return self.traceparent.trace_id


def consumer_name(agent_id: str) -> str:
    """The agent's durable on `MESH_DELIVER` and `MESH_CALL`: `agent-<id>`."""
    return f"agent-{agent_id}"


def receipts_consumer_name(agent_id: str) -> str:
    """The agent's durable of receipts on `MESH_DECISION`: `receipts-<id>`."""
    return f"receipts-{agent_id}"


def server_list(url: Union[str, Sequence[str], None] = None) -> List[str]:
    """The servers to connect to: `url` as one URL, comma-separated URLs or
    a list of them; `None` is the environment's `NATS_URL`, else
    `nats://127.0.0.1:4222`."""
    if url is None:
        url = os.environ.get("NATS_URL") or DEFAULT_NATS_URL
    parts = url.split(",") if isinstance(url, str) else [p for u in url for p in str(u).split(",")]
    servers = [p.strip() for p in parts if p.strip()]
    if not servers:
        raise ConnectError("no NATS URL given: pass one (`nats://127.0.0.1:4222`) or set NATS_URL")
    return servers


def refusal(agent_id: str, url: str, key: Optional[str], options: Dict[str, Any]) -> str:
    """What to say when the broker refused the connection: which key to pass."""
    expected = f".agentmesh/auth/agents/{agent_id}.nk"
    if key:
        given = f"with the nkey in `{key}`"
    elif any(k in options for k in _CREDENTIAL_OPTIONS):
        given = "with the credentials given"
    else:
        given = "without credentials"
    return (
        f"the broker at `{url}` refused agent `{agent_id}` {given} (authorization violation): "
        f"connect with the agent's own key, {NKEY_FILE_ENV}={expected} "
        f"(or `nkey_seed_file=`); `meshctl agents add {agent_id}` registers the agent and writes it"
    )


async def _connect_once(agent_id: str, servers: List[str], key: Optional[str], options: Dict[str, Any]):
    """Connects as nats-py does, but gives up on the first connect as
    async-nats does: at once when the broker refuses the credentials, after
    `_CONNECT_TRIES` failed tries of each server otherwise (nats-py alone
    would retry for two minutes). Once connected, nats-py's reconnects
    apply unchanged."""
    from nats.aio.client import Client

    nc = Client()
    connected = False
    failures: List[Exception] = []
    failed = asyncio.Event()
    user_error_cb = options.pop("error_cb", None)

    async def error_cb(e: Exception) -> None:
        if not connected:
            failures.append(e)
            if _refused(e) or len(failures) >= _CONNECT_TRIES * len(servers):
                failed.set()
        elif user_error_cb is None:
            log.warning("agent `%s`: NATS error: %s", agent_id, e)
        if user_error_cb is not None:
            await user_error_cb(e)

    shown = ",".join(servers)
    connecting = asyncio.ensure_future(nc.connect(servers, error_cb=error_cb, **options))
    gave_up = asyncio.ensure_future(failed.wait())
    try:
        await asyncio.wait([connecting, gave_up], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gave_up.cancel()
    if not connecting.done():
        connecting.cancel()
        try:
            await connecting
        except BaseException:
            pass
        try:
            await nc.close()
        except Exception:
            pass
    error = None if connecting.cancelled() else connecting.exception()
    connected = error is None and not connecting.cancelled()
    if connecting.cancelled() or error is not None:
        last = error or (failures[-1] if failures else None)
        if any(_refused(e) for e in failures) or (last is not None and _refused(last)):
            raise ConnectError(refusal(agent_id, shown, key, options)) from last
        if key and last is not None and "nkeys" in str(last).lower():
            raise ConnectError(
                f"`{key}` does not hold an nkey user seed ({last}): point it at agent "
                f"`{agent_id}`'s seed file, `.agentmesh/auth/agents/{agent_id}.nk`"
            ) from last
        raise ConnectError(
            f"could not connect to NATS at `{shown}`: {last}: start the stack (`meshctl up`) "
            "or point NATS_URL at a running broker"
        ) from last
    return nc


def _refused(e: BaseException) -> bool:
    return isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in str(e).lower()


def report_id(me: str, source: str, event_id: str) -> str:
    """The id of the give-up report on delivery `event_id` from `source`:
    the same for every attempt (as agents-sdk derives it), so a report
    published again after a crash is dropped by `MESH_INGRESS`."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"agentmesh:gave-up/{me}/{source}/{event_id}"))


def backoff(base: float, attempt: int, cap: float) -> float:
    """The wait before attempt `attempt + 1`: `base`, doubled per attempt."""
    return min(base * (2 ** max(0, min(attempt - 1, 20))), cap)


class Received:
    """A mesh event received by this agent: decoded, validated."""

    def __init__(self, subject: str, event: Event):
        self.subject_name = subject
        self.event = event
        _, self._sender = subject_parts(subject)
        validate(event, self._sender)
        tp = event.get("traceparent")
        self._trace = TraceParent.parse(tp) if tp else TraceParent.derived(event.id)

    @staticmethod
    def from_message(subject: str, headers: Optional[Dict[str, str]], payload: bytes) -> "Received":
        return Received(subject, decode(headers, payload))

    @property
    def id(self) -> str:
        return self.event.id

    @property
    def type(self) -> str:
        """The full type, e.g. `io.agentmesh.task.handoff`."""
        return self.event.type

    @property
    def short_type(self) -> str:
        return short_type(self.event.type)

    @property
    def sender(self) -> str:
        return self._sender

    @property
    def target(self) -> Optional[str]:
        return self.event.get("target")

    @property
    def trace(self) -> TraceParent:
        return self._trace

    @property
    def trace_id(self) -> str:
        return self._trace.trace_id

    @property
    def causation_id(self) -> Optional[str]:
        return self.event.get("causationid")

    @property
    def subject(self) -> Optional[str]:
        """The CloudEvents `subject` (the tool of a call or result)."""
        return self.event.get("subject")

    @property
    def data(self) -> bytes:
        return self.event.data

    @property
    def headers(self) -> Dict[str, str]:
        return self.event.headers

    def json(self) -> Any:
        return self.event.json()

    def __repr__(self) -> str:
        return f"Received({self.short_type} {self.id} from {self.sender})"


class Delivery(Received):
    """One delivery from the agent's durable: acknowledge it once handled."""

    def __init__(self, agent: "Agent", msg, received: Received):
        super().__init__(received.subject_name, received.event)
        self.agent = agent
        self.msg = msg
        self.settled = False

    @property
    def delivery_count(self) -> int:
        try:
            return int(self.msg.metadata.num_delivered)
        except Exception:
            return 1

    async def ack(self) -> None:
        self.settled = True
        await self.msg.ack()

    async def nak(self, delay: Optional[float] = None) -> None:
        self.settled = True
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()

    async def term(self) -> None:
        self.settled = True
        await self.msg.term()

    def workflow(self) -> "Workflow":
        """The sender's trace, continued after this delivery."""
        return self.agent._continue_after(self.trace, self.id, self.sender)

    async def reply(self, body: Any) -> Published:
        """An `io.agentmesh.message` back to the sender whose `causationid` is
        this delivery (what `Workflow.request` waits for)."""
        return await self.workflow().message(self.sender, body)

    async def fail(self, error: Any) -> str:
        """Records a failed attempt: refused and retried with backoff, or, on
        the agent's last attempt, given up on with a report (an
        `io.agentmesh.observation`, subject `delivery.gave_up`) and
        terminated. Returns `"retry"` or `"gave_up"`."""
        attempt = self.delivery_count
        a = self.agent
        if attempt >= a.max_attempts:
            await self._give_up(attempt, str(error))
            return "gave_up"
        delay = backoff(a.nak_delay, attempt, a.max_backoff)
        log.warning("handler failed on %s from %s (attempt %d/%d, retry in %.1fs): %s", self.id, self.sender, attempt, a.max_attempts, delay, error)
        await self.nak(delay)
        a.metrics["retries"] += 1
        return "retry"

    async def _give_up(self, attempts: int, error: str) -> None:
        me = self.agent.id
        gave_up = {"event_id": self.id, "source": self.sender, "type": self.type, "attempts": attempts, "error": error}
        text = f"{me} gave up on {self.short_type} {self.id} from {self.sender} after {attempts} attempts: {error}"
        try:
            await self.workflow().observation(text, gave_up=gave_up, _subject=GAVE_UP_SUBJECT, _id=report_id(me, self.sender, self.id))
        except AgentMeshError:
            await self.nak(backoff(self.agent.nak_delay, attempts, self.agent.max_backoff))
            raise
        await self.term()
        self.agent.metrics["gave_up"] += 1
        log.warning("gave up on %s from %s after %d attempts: %s", self.id, self.sender, attempts, error)


class ToolCall:
    """One `tool.call` for a tool this agent serves, as its handler sees it."""

    def __init__(self, agent: "Agent", received: Received):
        self.agent = agent
        self.received = received
        self.tool = received.subject or ""
        try:
            data = received.json()
        except ValueError:
            data = None
        self.arguments = data["arguments"] if isinstance(data, dict) and "arguments" in data else data

    @property
    def caller(self) -> str:
        return self.received.sender

    @property
    def id(self) -> str:
        return self.received.id

    @property
    def trace_id(self) -> str:
        return self.received.trace_id

    def arg(self, name: str) -> Any:
        """One named argument; a missing one fails the call."""
        from .errors import ToolError

        if not isinstance(self.arguments, dict) or name not in self.arguments:
            raise ToolError(f"missing argument `{name}` for `{self.tool}`")
        return self.arguments[name]

    def workflow(self) -> "Workflow":
        """The caller's trace, continued after the call."""
        return self.agent._continue_after(self.received.trace, self.received.id, self.received.sender)


class Workflow:
    """One trace and the chain of steps published in it. Each step is a
    child span of the trace and follows the step before it (`causationid`,
    `causationsource`); the first step of a fresh workflow is its root."""

    def __init__(
        self,
        agent: "Agent",
        trace: TraceParent,
        after: Optional[Tuple[str, Optional[str]]],
        parent: Optional[TraceParent] = None,
    ):
        self.agent = agent
        self.trace = trace
        self._last = after
        # The span the next step's span is a child of (OpenTelemetry).
        self._parent = parent

    @property
    def trace_id(self) -> str:
        """32 hex characters: what `meshctl trace` takes."""
        return self.trace.trace_id

    @property
    def last_event_id(self) -> Optional[str]:
        return self._last[0] if self._last else None

    def _set_last(self, event_id: str, agent: str, span: Optional[TraceParent] = None) -> None:
        self._last = (event_id, agent)
        if span is not None:
            self._parent = span

    def prepare(
        self,
        event_type: str,
        data: Any = None,
        *,
        target: Optional[str] = None,
        subject: Optional[str] = None,
        caused_by: Optional[str] = None,
        root: bool = False,
        event_id: Optional[str] = None,
    ) -> Tuple[Event, TraceParent]:
        """Builds (does not publish) a step's event."""
        if target is not None and not valid_agent_id(target):
            raise PublishError(f"target `{target}` is not a valid agent id")
        try:
            payload = json.dumps({} if data is None else data).encode()
        except (TypeError, ValueError) as e:
            raise PublishError(f"the step's data is not valid: {e}") from e
        event_type = full_type(event_type)
        trace = self.trace.child()
        attrs = {
            "specversion": "1.0",
            "id": event_id or new_event_id(),
            "source": f"/agents/{self.agent.id}",
            "type": event_type,
            "time": _now(),
            "traceparent": str(trace),
            "datacontenttype": "application/json",
        }
        if caused_by is not None:
            attrs["causationid"] = caused_by
        elif not root and self._last:
            attrs["causationid"] = self._last[0]
            if self._last[1]:
                attrs["causationsource"] = f"/agents/{self._last[1]}"
        if target is not None:
            attrs["target"] = target
        if subject:
            attrs["subject"] = subject
        return Event(attrs, payload), trace

    async def step(self, event_type: str, data: Any = None, **options: Any) -> Published:
        """Publishes a step of any catalogue type (`"action"` or
        `"io.agentmesh.action"`) and waits for `MESH_INGRESS`'s ack. Options:
        `target`, `subject`, `caused_by`, `root`, `event_id`."""
        event, trace = self.prepare(event_type, data, **options)
        return await self.send(event, trace)

    async def send(self, event: Event, trace: TraceParent) -> Published:
        published = await self.agent._publish(event, trace, self._parent)
        self._set_last(published.id, self.agent.id, trace)
        return published

    async def _typed(self, event_type: str, data: Dict[str, Any], fields: Dict[str, Any], target: Optional[str] = None) -> Published:
        subject = fields.pop("_subject", None)
        event_id = fields.pop("_id", None)
        data.update(fields)
        return await self.step(event_type, data, target=target, subject=subject, event_id=event_id)

    async def prompt(self, text: str, **fields: Any) -> Published:
        """`io.agentmesh.prompt`: input given to the agent (`{"text"}`)."""
        return await self._typed("prompt", {"text": text}, fields)

    async def reasoning(self, text: str, **fields: Any) -> Published:
        """`io.agentmesh.reasoning` (`{"text"}`; add `tokens=`)."""
        return await self._typed("reasoning", {"text": text}, fields)

    async def action(self, name: str, **fields: Any) -> Published:
        """`io.agentmesh.action` (`{"name"}`; add `description=`)."""
        return await self._typed("action", {"name": name}, fields)

    async def observation(self, text: str, **fields: Any) -> Published:
        """`io.agentmesh.observation` (`{"text"}`)."""
        return await self._typed("observation", {"text": text}, fields)

    async def memory_update(self, key: str, value: Any, **fields: Any) -> Published:
        """`io.agentmesh.memory.update` (`{"key", "value"}`)."""
        return await self._typed("memory.update", {"key": key, "value": value}, fields)

    async def output(self, text: str, **fields: Any) -> Published:
        """`io.agentmesh.output`: a final result (`{"text"}`)."""
        return await self._typed("output", {"text": text}, fields)

    async def handoff(self, target: str, task: str, context: Any = None, **fields: Any) -> Published:
        """`io.agentmesh.task.handoff` to `target` (`{"task"}`, `context`)."""
        data: Dict[str, Any] = {"task": task}
        if context is not None:
            data["context"] = context
        return await self._typed("task.handoff", data, fields, target=target)

    async def message(self, target: str, body: Any) -> Published:
        """`io.agentmesh.message` to `target` (`{"body"}`)."""
        return await self.step("message", {"body": body}, target=target)

    async def call_tool(self, tool: str, args: Any = None, *, on: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        """Calls `tool` with `args` and returns its result. The call goes to
        the agent whose card lists the tool (or `on`), through policy.
        Raises `Denied` / `Invalid` (with the receipt), `ToolFailed`,
        `TimedOut` or `NoProvider`."""
        provider = on
        if provider is None:
            cards = await self.agent.directory.find_by_tool(tool)
            provider = cards[0].id if cards else None
        event, trace = self.prepare(
            "tool.call", {"tool": tool, "arguments": {} if args is None else args}, target=provider, subject=tool
        )
        answer = await self.agent._exchange(self, event, trace, full_type("tool.result"), timeout)
        if answer is None:
            raise NoProvider(tool)
        try:
            result = answer.json()
        except ValueError as e:
            raise AgentMeshError("the answer could not be decoded") from e
        if isinstance(result, dict) and result.get("ok"):
            return result.get("result")
        message = result.get("error") if isinstance(result, dict) else None
        raise ToolFailed(tool, message or "the tool reported an error without a message")

    async def request(self, target: str, body: Any, *, timeout: Optional[float] = None, subject: Optional[str] = None) -> Received:
        """Sends `body` to `target` as an `io.agentmesh.message` and returns
        the reply (a message from `target` whose `causationid` is this one)."""
        event, trace = self.prepare("message", {"body": body}, target=target, subject=subject)
        answer = await self.agent._exchange(self, event, trace, full_type("message"), timeout)
        if answer is None:
            raise AgentMeshError("a message without a target got no answer")
        return answer


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


class Agent:
    """An agent of the mesh. Configure it (card, tools), then `connect`.

        agent = Agent("coder", description="Searches the repository")

        @agent.tool("code.search", input_schema={"type": "object"})
        async def search(call):
            return {"matches": []}

        await agent.connect("nats://127.0.0.1:4222", nkey_seed_file=".agentmesh/auth/agents/coder.nk")
        await agent.serve(stop=stop_event)
    """

    def __init__(
        self,
        agent_id: str,
        *,
        name: str = "",
        description: str = "",
        version: str = "0.1.0",
        skills: Optional[List[Skill]] = None,
        register_card: bool = True,
        ack_wait: float = DEFAULT_ACK_WAIT,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        nak_delay: float = 1.0,
        max_backoff: float = 60.0,
        max_concurrent_deliveries: int = 1,
        max_concurrent_tools: int = 16,
        shutdown_grace: float = 10.0,
        verify_deliveries: Optional[bool] = None,
    ):
        if not valid_agent_id(agent_id):
            raise InvalidAgentId(agent_id)
        self.id = agent_id
        self.card = AgentCard(agent_id, name=name or agent_id, description=description, version=version, skills=list(skills or []))
        self.register_card = register_card
        self.ack_wait = ack_wait
        self.call_timeout = call_timeout
        self.max_attempts = max(1, max_attempts)
        self.nak_delay = nak_delay
        self.max_backoff = max_backoff
        self.max_concurrent_deliveries = max(1, max_concurrent_deliveries)
        self.max_concurrent_tools = max(1, max_concurrent_tools)
        self.shutdown_grace = shutdown_grace
        # None: verify where the mesh has `mesh-signers` (signed decisions);
        # True: always (nothing is trusted without the bucket); False: never.
        self.verify_deliveries = verify_deliveries
        self._trust: Optional[Trust] = None
        self.metrics: Dict[str, int] = {"handled": 0, "retries": 0, "gave_up": 0, "invalid": 0, "tool_calls": 0, "refused": 0}
        self._tools: Dict[str, ToolHandler] = {}
        self.nc = None
        self.js = None
        self.directory: Directory = None  # type: ignore[assignment]
        self._deliveries = None
        self._calls = None
        self._receipts = None
        self._waiters: Dict[str, asyncio.Queue] = {}
        self._recent: "OrderedDict[str, Receipt]" = OrderedDict()
        self._awaited: "OrderedDict[str, Tuple[str, str]]" = OrderedDict()
        self._answers_sub = None
        self._tasks: List[asyncio.Task] = []
        self._running: set = set()
        # Made by `connect`, inside the running loop: an asyncio object made
        # here would be bound to whatever loop was current when the agent
        # was created (Python 3.9: "attached to a different loop" once
        # `asyncio.run` starts another).
        self._closed: Optional[asyncio.Event] = None

    # -- configuration ------------------------------------------------------

    def tool(self, name: str, *, description: str = "", input_schema: Optional[Dict[str, Any]] = None):
        """Decorator: serves tool `name` with the decorated function (sync or
        async, taking a `ToolCall`, returning any JSON value; raising fails
        the call with the exception's text)."""

        def register(handler: ToolHandler) -> ToolHandler:
            self.add_tool(ToolSpec(name, description, input_schema or {"type": "object"}), handler)
            return handler

        return register

    def add_tool(self, spec: ToolSpec, handler: ToolHandler) -> None:
        """Serves a tool: lists it in the card, answers its calls."""
        self.card.tools = [t for t in self.card.tools if t.name != spec.name] + [spec]
        self._tools[spec.name] = handler

    # -- connecting -----------------------------------------------------------

    async def connect(
        self,
        url: Union[str, Sequence[str], None] = None,
        *,
        nkey_seed: Optional[str] = None,
        nkey_seed_file: Optional[str] = None,
        credentials_file: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        token: Optional[str] = None,
        **options: Any,
    ) -> "Agent":
        """Connects to NATS and sets the agent up: checks the mesh's streams,
        binds its durables, starts reading its receipts, writes its card.

        `url` is one URL, the URLs of a cluster's nodes separated by commas
        (as in Rust), or a list of them; default: the environment's
        `NATS_URL`, else `nats://127.0.0.1:4222`. Without credentials in the
        arguments, the nkey seed file named by `AGENTMESH_NKEY_FILE` is
        used when that is set (the key `meshctl agents add <id>` writes to
        `.agentmesh/auth/agents/<id>.nk`)."""
        servers = server_list(url)
        kwargs: Dict[str, Any] = dict(options)
        kwargs.setdefault("name", f"agentmesh-agent-{self.id}")
        if nkey_seed:
            kwargs["nkeys_seed_str"] = nkey_seed
        if nkey_seed_file:
            kwargs["nkeys_seed"] = nkey_seed_file
        if credentials_file:
            kwargs["user_credentials"] = credentials_file
        if user is not None:
            kwargs["user"], kwargs["password"] = user, password
        if token is not None:
            kwargs["token"] = token
        key_from_env = None
        if not any(k in kwargs for k in _CREDENTIAL_OPTIONS):
            key_from_env = os.environ.get(NKEY_FILE_ENV) or None
            if key_from_env:
                if not os.path.isfile(key_from_env):
                    raise ConnectError(
                        f"{NKEY_FILE_ENV}=`{key_from_env}` is not a file: point it at the agent's "
                        f"nkey seed (`.agentmesh/auth/agents/{self.id}.nk`, written by "
                        f"`meshctl agents add {self.id}`)"
                    )
                kwargs["nkeys_seed"] = key_from_env
        kwargs.setdefault("allow_reconnect", True)
        # The servers are tried in the order given, as in Rust.
        kwargs.setdefault("dont_randomize", True)
        self._closed = asyncio.Event()
        self.nc = await _connect_once(self.id, servers, key_from_env or kwargs.get("nkeys_seed"), kwargs)
        self.js = self.nc.jetstream()
        try:
            await self._setup()
        except BaseException:
            await self.nc.close()
            raise
        return self

    async def connect_with(self, nc) -> "Agent":
        """Sets the agent up on an existing nats-py connection."""
        self.nc = nc
        self.js = nc.jetstream()
        self._closed = asyncio.Event()
        await self._setup()
        return self

    async def _setup(self) -> None:
        me = self.id
        for stream, subject in (
            (STREAM_INGRESS, f"mesh.ingress.{me}.step"),
            (STREAM_DELIVER, f"mesh.deliver.{me}.any"),
            (STREAM_DECISION, f"mesh.decision.{me}"),
        ):
            try:
                found = await self.js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError as e:
                raise MissingStream(stream) from e
            except Exception as e:
                raise ConnectError(f"JetStream request failed while setting up the agent: {e}") from e
            if found != stream:
                raise MissingStream(stream)
        name = consumer_name(me)
        self._deliveries = await self._durable(STREAM_DELIVER, name, f"deliveries to agent `{me}`", f"mesh.deliver.{me}.>", self.ack_wait)
        try:
            has_calls = await self.js.find_stream_name_by_subject(f"mesh.call.{me}.any") == STREAM_CALL
        except Exception:
            has_calls = False
        if has_calls:
            try:
                self._calls = await self._durable(STREAM_CALL, name, f"tool calls to agent `{me}`", f"mesh.call.{me}.>", self.ack_wait)
            except ConnectError as e:
                log.warning("cannot bind the tool-call durable on MESH_CALL; tool calls come as deliveries: %s", e)
        # Receipts are read from the stream, through the agent's own durable
        # (nothing written while the agent was away is missed).
        self._receipts = await self._durable(
            STREAM_DECISION, receipts_consumer_name(me), f"decision receipts of agent `{me}`", f"mesh.decision.{me}", DEFAULT_ACK_WAIT
        )
        if self.verify_deliveries is not False:
            self._trust = await Trust.open(self.js)
            if self._trust is None and self.verify_deliveries:
                log.warning("no `mesh-signers` bucket: every delivery will be refused (verify_deliveries=False turns verification off)")
                self._trust = Trust(self.js, None)
        self.directory = await Directory.open(self.js)
        if self.register_card:
            try:
                await self.directory.register(self.card)
            except Exception as e:
                raise ConnectError(f"could not publish the agent card: {e}") from e
        telemetry.setup(self.id)
        self._tasks.append(asyncio.ensure_future(self._read_receipts()))

        # While connected, also the receipts subject: replicas of one agent
        # share its durable, where each receipt reaches one of them, and
        # each must see the receipts of its own events (as in Rust).
        async def on_receipt(msg) -> None:
            try:
                self._received(Receipt(json.loads(msg.data)))
            except (ValueError, AttributeError, TypeError):
                log.warning("ignoring a decision receipt that does not parse")

        await self.nc.subscribe(f"mesh.decision.{me}", cb=on_receipt)

    async def _durable(self, stream: str, name: str, description: str, filter_subject: str, ack_wait: float):
        """Creates the durable (or re-sends its create unchanged, where the
        operator made it: name + filter is the one create an agent's key may
        send) and binds a pull subscription to it."""
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            filter_subject=filter_subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=1000,
        )
        try:
            await self.js.add_consumer(stream, config)
        except Exception as e:
            # Made by the operator with other settings: bind it as it is.
            if "already exists" not in str(e) and "already in use" not in str(e):
                raise ConnectError(f"could not create the consumer `{name}` on `{stream}`: {e}") from e
            log.debug("%s on %s exists with other settings (%s); binding it", name, stream, e)
        return await self.js.pull_subscribe_bind(name, stream=stream)

    async def close(self) -> None:
        """Stops the readers and running handlers (after the shutdown
        grace), flushes and closes the connection."""
        if self._closed is not None:
            self._closed.set()
        if self._running:
            await asyncio.wait(list(self._running), timeout=self.shutdown_grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:
                pass
        self._tasks.clear()
        # A later `connect` subscribes again, on its own connection.
        self._answers_sub = None
        telemetry.flush()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.flush()
            except Exception:
                pass
            await self.nc.close()

    def _closed_event(self) -> asyncio.Event:
        if self._closed is None:
            raise ConnectError(f"agent `{self.id}` is not connected: `await agent.connect(...)` first")
        return self._closed

    async def __aenter__(self) -> "Agent":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- workflows -------------------------------------------------------

    def workflow(self) -> Workflow:
        """A new workflow: mints a trace whose first step is its root."""
        return Workflow(self, TraceParent.mint(), None)

    def continue_trace(self, traceparent: Union[str, TraceParent], after: Optional[str] = None) -> Workflow:
        """Continues a trace started elsewhere (its span is the parent of the
        next step's); the next step follows event `after`."""
        tp = TraceParent.parse(traceparent) if isinstance(traceparent, str) else traceparent
        return Workflow(self, tp, (after, None) if after else None, tp)

    def _continue_after(self, trace: TraceParent, event_id: str, agent: str) -> Workflow:
        return Workflow(self, trace, (event_id, agent), trace)

    async def _publish(self, event: Event, trace: TraceParent, parent: Optional[TraceParent] = None) -> Published:
        step = step_token(event.type)
        subject = f"mesh.ingress.{self.id}.{step}"
        headers, payload = event.encode_binary()
        # Lets JetStream drop a re-sent copy of the same event.
        headers["Nats-Msg-Id"] = event_key(self.id, event.id)
        with telemetry.step_span(self.id, event, trace, parent):
            try:
                ack = await self.js.publish(subject, payload, headers=headers)
            except Exception as e:
                raise PublishError(f"`MESH_INGRESS` did not acknowledge the event on `{subject}`: {e}") from e
        return Published(event.id, trace, subject, ack.seq, bool(ack.duplicate))

    # -- receipts ------------------------------------------------------------

    async def _read_receipts(self) -> None:
        closed = self._closed_event()
        while not closed.is_set():
            try:
                msgs = await self._receipts.fetch(64, timeout=_FETCH_WAIT)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if closed.is_set() or self.nc.is_closed:
                    return
                log.debug("reading receipts failed: %s", e)
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                try:
                    receipt = Receipt(json.loads(msg.data))
                except ValueError:
                    log.warning("ignoring a decision receipt that does not parse")
                    await msg.term()
                    continue
                self._received(receipt)
                await msg.ack()

    def _received(self, receipt: Receipt) -> None:
        self._recent[receipt.event_id] = receipt
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        self._hand_over(receipt.event_id, ("decision", receipt))

    def _hand_over(self, event_id: str, arrival: Tuple[str, Any]) -> None:
        queue = self._waiters.get(event_id)
        if queue is not None:
            queue.put_nowait(arrival)

    def _wait_for(self, event_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._waiters[event_id] = queue
        earlier = self._recent.get(event_id)
        if earlier is not None:
            queue.put_nowait(("decision", earlier))
        return queue

    async def await_decision(self, event_id: str, timeout: Optional[float] = None) -> Receipt:
        """The policy worker's receipt of event `event_id`, which this agent
        published; whether it came before or after the wait (the agent keeps
        its latest 4096 receipts)."""
        timeout = self.call_timeout if timeout is None else timeout
        queue = self._wait_for(event_id)
        try:
            while True:
                kind, value = await asyncio.wait_for(queue.get(), timeout)
                if kind == "decision" and value.event_id == event_id:
                    return value
        except asyncio.TimeoutError:
            raise DecisionTimedOut(event_id, timeout) from None
        finally:
            self._waiters.pop(event_id, None)

    # -- calls ---------------------------------------------------------------

    async def _start_answers(self) -> None:
        if self._answers_sub is not None:
            return

        async def on_answer(msg) -> None:
            try:
                answer = Received.from_message(msg.subject, msg.headers, msg.data)
            except (InvalidEvent, ValueError):
                return
            if self._trust is not None:
                try:
                    await self._trust.verify(answer.event, answer.sender, msg.headers, msg.data)
                except Refused:
                    # Refused (logged, counted) where the durable's copy is read.
                    return
            if answer.causation_id:
                self._hand_over(answer.causation_id, ("answer", answer))

        # Answers come on a plain subscription, never behind the agent's own
        # backlog; the durable's copy is acknowledged by the delivery reader.
        self._answers_sub = await self.nc.subscribe(f"mesh.deliver.{self.id}.>", cb=on_answer)

    def _remember_call(self, event_id: str, answer_type: str, target: str) -> None:
        self._awaited[event_id] = (answer_type, target)
        while len(self._awaited) > _RECENT:
            self._awaited.popitem(last=False)

    def _was_awaited(self, received: Received) -> bool:
        awaited = self._awaited.get(received.causation_id or "")
        return awaited is not None and awaited == (received.type, received.sender)

    async def _exchange(self, wf: Workflow, event: Event, trace: TraceParent, answer_type: str, timeout: Optional[float]) -> Optional[Received]:
        timeout = self.call_timeout if timeout is None else timeout
        target = event.get("target")
        if target:
            self._remember_call(event.id, answer_type, target)
        # Listen before publishing, so neither receipt nor answer is missed.
        await self._start_answers()
        queue = self._wait_for(event.id)
        try:
            await wf.send(event, trace)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            decision: Optional[str] = None
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimedOut(timeout, decision)
                try:
                    kind, value = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    raise TimedOut(timeout, decision) from None
                if kind == "decision":
                    if value.decision == "allow":
                        if not target:
                            return None
                        decision = "allow"
                    elif value.decision == "invalid":
                        raise Invalid(value)
                    else:
                        raise Denied(value)
                elif value.type == answer_type and value.sender == target:
                    wf._set_last(value.id, value.sender, value.trace)
                    return value
        finally:
            self._waiters.pop(event.id, None)

    # -- serving ---------------------------------------------------------------

    async def serve(self, handler: Optional[DeliveryHandler] = None, *, stop: Optional[asyncio.Event] = None) -> None:
        """Serves the registered tools and hands every other delivery to `handler` (sync or async), up to
        `max_concurrent_deliveries` at once, until `stop` is set. A handler
        that returns acknowledges the delivery; one that raises hands it
        back to be retried with backoff, and after `max_attempts` the agent
        gives up on it and says so. Without a handler other deliveries are
        logged and acknowledged."""
        stop = stop or asyncio.Event()
        slots = asyncio.Semaphore(self.max_concurrent_deliveries)
        tool_slots = asyncio.Semaphore(self.max_concurrent_tools)
        readers = [asyncio.ensure_future(self._serve_deliveries(handler, slots, tool_slots, stop))]
        if self._calls is not None:
            readers.append(asyncio.ensure_future(self._serve_calls(tool_slots, stop)))
        waiter = asyncio.ensure_future(stop.wait())
        closed = asyncio.ensure_future(self._closed_event().wait())
        try:
            done, _ = await asyncio.wait(readers + [waiter, closed], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task in readers and task.exception():
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in readers + [waiter, closed]:
                task.cancel()
            for task in readers:
                try:
                    await task
                except BaseException:
                    pass
            if self._running:
                await asyncio.wait(list(self._running), timeout=self.shutdown_grace)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _fetch(self, sub, batch: int) -> list:
        try:
            return await sub.fetch(batch, timeout=_FETCH_WAIT)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []

    async def _serve_deliveries(self, handler, slots: asyncio.Semaphore, tool_slots: asyncio.Semaphore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Pull only what can start now, so nothing waits in a buffer
            # while its ack wait runs out.
            await slots.acquire()
            slots.release()
            for msg in await self._fetch(self._deliveries, 1):
                await self._route(msg, handler, slots, tool_slots)

    async def _serve_calls(self, tool_slots: asyncio.Semaphore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await tool_slots.acquire()
            tool_slots.release()
            for msg in await self._fetch(self._calls, 1):
                try:
                    call = Received.from_message(msg.subject, msg.headers, msg.data)
                except (InvalidEvent, ValueError) as e:
                    await self._terminate_invalid(msg, e)
                    continue
                if not await self._verified(msg, call):
                    continue
                handler = self._tools.get(call.subject or "")
                if handler is not None and call.short_type == "tool.call":
                    await self._answer_tool(msg, call, handler, tool_slots)
                else:
                    # Left to its copy on `mesh.deliver`, as agents-sdk does.
                    await msg.ack()

    async def _verified(self, msg, received: Received) -> bool:
        """Whether `msg` carries a valid decision signature by a trusted
        signer (always, without verification). One that does not is logged,
        counted and acknowledged: it never reaches a handler and is not
        delivered again."""
        if self._trust is None:
            return True
        try:
            await self._trust.verify(received.event, received.sender, msg.headers, msg.data)
            return True
        except Refused as e:
            self.metrics["refused"] += 1
            log.warning("refusing delivery %s from %s on %s (%s): %s", received.id, received.sender, msg.subject, e.label, e)
            try:
                await msg.ack()
            except Exception:
                pass
            return False

    async def _terminate_invalid(self, msg, error: Exception) -> None:
        log.warning("terminating a delivery on %s that is not a valid mesh event: %s", msg.subject, error)
        self.metrics["invalid"] += 1
        try:
            await msg.term()
        except Exception:
            pass

    async def _route(self, msg, handler, slots: asyncio.Semaphore, tool_slots: asyncio.Semaphore) -> None:
        try:
            received = Received.from_message(msg.subject, msg.headers, msg.data)
        except (InvalidEvent, ValueError) as e:
            await self._terminate_invalid(msg, e)
            return
        if not await self._verified(msg, received):
            return
        if self._was_awaited(received):
            await msg.ack()  # consumed by its call
            return
        if received.short_type == "tool.call":
            tool = self._tools.get(received.subject or "")
            if tool is not None and header(msg.headers, "Mesh-Call") is not None and self._calls is not None:
                await msg.ack()  # the same call, answered from MESH_CALL
                return
            if tool is not None or handler is None:
                # A tool this agent does not serve, without a handler: the
                # caller gets an error rather than a timeout.
                await self._answer_tool(msg, received, tool, tool_slots)
                return
        if handler is None:
            log.info("no handler: acknowledging %s %s from %s", received.short_type, received.id, received.sender)
            await msg.ack()
            return
        await slots.acquire()
        self._spawn(self._handle(Delivery(self, msg, received), handler, slots))

    async def _keepalive(self, msg) -> None:
        period = max(self.ack_wait / 2, 0.1)
        while True:
            await asyncio.sleep(period)
            try:
                await msg.in_progress()
            except Exception:
                pass

    async def _with_keepalive(self, msg, work):
        keep = asyncio.ensure_future(self._keepalive(msg))
        try:
            return await work
        finally:
            keep.cancel()

    async def _handle(self, delivery: Delivery, handler, slots: asyncio.Semaphore) -> None:
        try:
            async def run():
                with telemetry.handler_span(self.id, delivery):
                    out = handler(delivery)
                    if inspect.isawaitable(out):
                        await out

            try:
                await self._with_keepalive(delivery.msg, run())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not delivery.settled:
                    try:
                        await delivery.fail(f"{type(e).__name__}: {e}" if not str(e) else str(e))
                    except Exception as report_error:
                        log.warning("could not report the failed delivery %s: %s", delivery.id, report_error)
                return
            if not delivery.settled:
                await delivery.ack()
            self.metrics["handled"] += 1
        finally:
            slots.release()

    async def _answer_tool(self, msg, call: Received, handler: Optional[ToolHandler], tool_slots: asyncio.Semaphore) -> None:
        await tool_slots.acquire()

        async def run() -> None:
            try:
                tool = call.subject or ""
                if handler is None:
                    data = {"tool": tool, "ok": False, "error": f"agent `{self.id}` does not serve tool `{tool}`"}
                else:
                    with telemetry.tool_span(self.id, call):
                        try:
                            out = handler(ToolCall(self, call))
                            if inspect.isawaitable(out):
                                out = await self._with_keepalive(msg, out)
                            data = {"tool": tool, "ok": True, "result": out}
                        except Exception as e:
                            data = {"tool": tool, "ok": False, "error": str(e) or type(e).__name__}
                wf = self._continue_after(call.trace, call.id, call.sender)
                try:
                    await wf.step("tool.result", data, target=call.sender, subject=tool)
                except AgentMeshError as e:
                    log.warning("could not publish the result of %s; the call will come again: %s", call.id, e)
                    await msg.nak(delay=self.nak_delay)
                    return
                self.metrics["tool_calls"] += 1
                await msg.ack()
            finally:
                tool_slots.release()

        self._spawn(run())
