"""The Python half of an agent pair: `planner` (this script, Python) asks
the Rust `coder` (`cargo run -p agents-sdk --example tool_server`) to search
the code, is denied `shell.exec`, hands the task to the coder and asks it a
question, then records its output. Every step goes through the policy
worker; `meshctl trace <trace id>` shows the whole workflow.

    pip install ./sdk/python
    python3 sdk/python/examples/planner.py [--nats-url URL] [--nkey-seed-file FILE] [--query TEXT]
"""

import argparse
import asyncio
import json
import os

from agentmesh import Agent, Denied


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument(
        "--nkey-file",
        "--nkey-seed-file",
        dest="nkey_file",
        help="the planner's seed (`.agentmesh/auth/agents/planner.nk`); default: AGENTMESH_NKEY_FILE",
    )
    parser.add_argument("--query", default="NATS")
    args = parser.parse_args()

    planner = Agent("planner", description="Plans the work and hands it out")
    await planner.connect(args.nats_url, nkey_seed_file=args.nkey_file)
    try:
        wf = planner.workflow()
        prompt = await wf.prompt(f"Where does the code talk about {args.query}?")
        await wf.reasoning("The coder can search the code", tokens=12)
        found = await wf.call_tool("code.search", {"query": args.query, "limit": 3})
        print("code.search:", json.dumps(found))
        try:
            await wf.call_tool("shell.exec", {"cmd": "make"}, on="coder")
        except Denied as e:
            print("shell.exec denied by", ", ".join(e.reasons))
        handoff = await wf.handoff("coder", f"summarise what mentions {args.query}", context={"hits": found})
        receipt = await planner.await_decision(handoff.id)
        print("handoff", receipt.decision, "by", ", ".join(receipt.reasons))
        reply = await wf.request("coder", {"question": "done?"})
        print("coder replied:", json.dumps(reply.json()["body"]))
        await wf.memory_update("last_query", args.query)
        await wf.output(f"{len((found or {}).get('matches', []))} places mention {args.query}")
        first = await planner.await_decision(prompt.id)
        print("prompt", first.decision)
        print("trace", wf.trace_id)
    finally:
        await planner.close()


if __name__ == "__main__":
    asyncio.run(main())
