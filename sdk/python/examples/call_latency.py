"""Times tool calls from a Python agent through the mesh: `planner` calls
`code.search` on the `coder` (e.g. the Rust `tool_server` example) `--calls`
times, one at a time and then `--concurrency` at once, and prints p50, p99
and the rate. Every call goes through the policy worker (decided,
delivered, answered, decided again, delivered back). Prints figures; never
fails on timing.

    python3 sdk/python/examples/call_latency.py [--nats-url URL] [--calls 200] [--concurrency 10]
"""

import argparse
import asyncio
import os
import time

from agentmesh import Agent


def quantile(sorted_ms, q):
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument(
        "--nkey-file",
        "--nkey-seed-file",
        dest="nkey_file",
        help="the planner's seed (`.agentmesh/auth/agents/planner.nk`); default: AGENTMESH_NKEY_FILE",
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    planner = await Agent("planner").connect(args.nats_url, nkey_seed_file=args.nkey_file)
    try:
        wf = planner.workflow()
        await wf.call_tool("code.search", {"query": "warm-up", "limit": 1}, on="coder")

        async def one():
            start = time.perf_counter()
            await planner.workflow().call_tool("code.search", {"query": "NATS", "limit": 1}, on="coder")
            return (time.perf_counter() - start) * 1000

        serial = sorted([await one() for _ in range(args.calls)])
        began = time.perf_counter()
        slots = asyncio.Semaphore(args.concurrency)

        async def limited():
            async with slots:
                return await one()

        concurrent = sorted(await asyncio.gather(*(limited() for _ in range(args.calls))))
        elapsed = time.perf_counter() - began
        print(f"one at a time: {args.calls} calls, p50 {quantile(serial, 0.5):.1f} ms, p99 {quantile(serial, 0.99):.1f} ms")
        print(
            f"{args.concurrency} at once: {args.calls} calls, p50 {quantile(concurrent, 0.5):.1f} ms, "
            f"p99 {quantile(concurrent, 0.99):.1f} ms, {args.calls / elapsed:.0f} calls/s"
        )
    finally:
        await planner.close()


if __name__ == "__main__":
    asyncio.run(main())
