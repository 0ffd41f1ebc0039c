"""Publish one binary-mode CloudEvent to agentmesh from plain nats-py and
print its decision receipt (and the delivered copy, when it was routed).

    pip install nats-py
    python3 publish_event.py [--nats-url nats://127.0.0.1:4222] [--tool shell.exec]
                             [--nkey-seed .agentmesh/auth/agents/planner.nk]

With `meshctl up` (authorization on) connect with the planner's key
(`pip install nkeys` too); an agent may read only its own deliveries, so the
delivered copy is then not read. `meshctl up --insecure` needs no key.

The receipt is read from the stream `MESH_DECISION` through the planner's
durable consumer `receipts-planner`, not with a core subscription: a core
subscription also sees publishes that the stream deduplicated (the policy
worker publishes a receipt again when an ingress event is redelivered).

Nothing here is agentmesh-specific code: any NATS client can do the same.
"""

import argparse
import asyncio
import json
import urllib.parse
import uuid

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

RECEIPTS_STREAM = "MESH_DECISION"
RECEIPTS_CONSUMER = "receipts-planner"


def pct(value: str) -> str:
    """Percent-encode a header value as the CloudEvents NATS binding says:
    space, double-quote, percent and everything outside printable ASCII."""
    return urllib.parse.quote(value, safe="!#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


async def bind_receipts(js):
    """The planner's receipts durable, created or, where `meshctl up` already
    made it, re-sent unchanged. With `name` and `filter_subject` nats-py sends
    the create to `$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-planner.
    mesh.decision.planner`, the one create the planner's key may send."""
    await js.add_consumer(
        RECEIPTS_STREAM,
        ConsumerConfig(
            name=RECEIPTS_CONSUMER,
            durable_name=RECEIPTS_CONSUMER,
            description="decision receipts of agent `planner`",
            filter_subject="mesh.decision.planner",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=-1,
            max_ack_pending=1000,
        ),
    )
    return await js.pull_subscribe_bind(RECEIPTS_CONSUMER, stream=RECEIPTS_STREAM)


async def await_receipt(receipts, event_id: str, timeout: float = 10) -> dict:
    """The receipt of `event_id`. Receipts of earlier events still waiting in
    the durable come first: they are acknowledged and skipped."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"no receipt for {event_id} within {timeout}s")
        try:
            msgs = await receipts.fetch(1, timeout=min(left, 2))
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            receipt = json.loads(msg.data)
            await msg.ack()
            if receipt["event_id"] == event_id:
                return receipt


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--tool", help="send a tool.call for this tool instead of a handoff")
    parser.add_argument("--nkey-seed", help="the planner's seed file, when the broker requires keys")
    args = parser.parse_args()

    if args.nkey_seed:
        nc = await nats.connect(args.nats_url, nkeys_seed=args.nkey_seed)
    else:
        nc = await nats.connect(args.nats_url)
    js = nc.jetstream()

    event_id = str(uuid.uuid4())
    trace_id = uuid.uuid4().hex
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/agents/planner",
        "ce-traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
        "ce-datacontenttype": "application/json",
        "ce-target": "coder",
    }
    if args.tool:
        headers["ce-type"] = "io.agentmesh.tool.call"
        headers["ce-subject"] = pct(args.tool)
        subject = "mesh.ingress.planner.tool_call"
        data = {"arguments": {"query": "parser"}}
    else:
        headers["ce-type"] = "io.agentmesh.task.handoff"
        headers["ce-subject"] = pct("Implement the parser — “fast”")
        subject = "mesh.ingress.planner.handoff"
        data = {"task": "implement the parser"}

    receipts = await bind_receipts(js)
    ack = await js.publish(subject, json.dumps(data).encode(), headers=headers)
    print(f"published {event_id} to {subject} (stream {ack.stream}, seq {ack.seq})")

    receipt = await await_receipt(receipts, event_id)
    print("receipt:", json.dumps({k: receipt[k] for k in ("event_id", "trace_id", "decision", "reasons", "policy_hash")}))

    if receipt["decision"] == "allow" and args.nkey_seed:
        print("delivered copy not read: as planner this client may read only its own deliveries")
    elif receipt["decision"] == "allow":
        sub = await js.subscribe("mesh.deliver.coder.planner", ordered_consumer=True)
        while True:
            delivered = await sub.next_msg(timeout=10)
            if delivered.headers.get("ce-id") == event_id:
                break
        print("delivered:", delivered.subject, delivered.data.decode())
    await nc.flush()  # the acks
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
