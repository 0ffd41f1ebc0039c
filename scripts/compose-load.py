#!/usr/bin/env python3
"""A small load for scripts/compose-check.sh: `--events` reasoning steps of
one workflow of the agent `planner` (a Python SDK agent), published at
`--rate` per second to a composed stack, then counted in its ClickHouse.

Each step has its own event id and is published until `MESH_INGRESS`
acknowledges it (a publish that fails while a NATS node is down is sent
again with the same id: the stream's duplicate window keeps one copy). Once
all are acknowledged it waits until every one has its row in
`agentmesh.events` and its decision in `agentmesh.decisions` on one of the
`--clickhouse-url`s, or `--wait-secs` pass. Prints one JSON object
(`acknowledged`, `in_events`, `decided`, `lost`, `trace_id`, `seconds`) and
exits 0 only when nothing acknowledged is missing.

`--progress FILE` is rewritten with the number of acknowledged steps as
they go, so that the caller can kill servers part-way.

    python3 scripts/compose-load.py --nats-url nats://127.0.0.1:4222 \\
        --clickhouse-url http://127.0.0.1:8123 --events 300 --rate 30
"""

import argparse
import asyncio
import base64
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from agentmesh import Agent
from agentmesh.events import new_event_id


def query(urls, user, password, sql, timeout=5.0):
    """The first answer of any of `urls` to `sql` (TabSeparated text)."""
    errors = []
    for url in urls:
        request = urllib.request.Request(
            url.rstrip("/") + "/?" + urllib.parse.urlencode({"query": sql}),
            headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.read().decode()
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{url}: {e}")
    raise RuntimeError("no ClickHouse answered: " + "; ".join(errors))


async def publish_all(args, progress):
    servers = [u.strip() for u in args.nats_url.split(",") if u.strip()]
    planner = await Agent("planner").connect(servers, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    try:
        wf = planner.workflow()
        ids = []
        retries = 0
        started = time.monotonic()
        for i in range(args.events):
            due = started + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event_id = new_event_id()
            deadline = time.monotonic() + args.publish_timeout
            while True:
                try:
                    await wf.step("reasoning", {"text": f"compose load step {i}"}, event_id=event_id)
                    break
                except Exception as e:  # a node down: the same event again
                    retries += 1
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"step {i} not acknowledged within {args.publish_timeout} s: {e}") from e
                    await asyncio.sleep(0.2)
            ids.append(event_id)
            if progress:
                with open(progress, "w") as f:
                    f.write(f"{len(ids)}\n")
        return wf.trace_id, ids, retries
    finally:
        await planner.close()


def count(args, urls, table, trace_id):
    sql = f"SELECT count(DISTINCT event_id) FROM {args.database}.{table} WHERE trace_id = '{trace_id}'"
    return int(query(urls, args.user, args.password, sql).strip() or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats-url", required=True, help="one URL, or several separated by commas")
    parser.add_argument("--clickhouse-url", required=True, help="one URL, or several separated by commas")
    parser.add_argument("--user", default="agentmesh")
    parser.add_argument("--password", default="agentmesh")
    parser.add_argument("--database", default="agentmesh")
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0, help="steps per second")
    parser.add_argument("--publish-timeout", type=float, default=60.0, help="seconds one step may take to be acknowledged")
    parser.add_argument("--wait-secs", type=float, default=120.0, help="seconds to wait for the rows in ClickHouse")
    parser.add_argument("--progress", help="file rewritten with the number of acknowledged steps")
    args = parser.parse_args()
    began = time.monotonic()
    trace_id, ids, retries = asyncio.run(publish_all(args, args.progress))
    urls = [u.strip() for u in args.clickhouse_url.split(",") if u.strip()]
    deadline = time.monotonic() + args.wait_secs
    in_events = decided = 0
    while True:
        try:
            in_events = count(args, urls, "events", trace_id)
            decided = count(args, urls, "decisions", trace_id)
        except RuntimeError as e:
            print(f"compose-load: {e}", file=sys.stderr)
        if (in_events >= len(ids) and decided >= len(ids)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lost = len(ids) - min(in_events, decided)
    print(
        json.dumps(
            {
                "trace_id": trace_id,
                "acknowledged": len(ids),
                "publish_retries": retries,
                "in_events": in_events,
                "decided": decided,
                "lost": lost,
                "seconds": round(time.monotonic() - began, 1),
            }
        )
    )
    return 0 if lost == 0 and len(ids) == args.events else 1


if __name__ == "__main__":
    sys.exit(main())
