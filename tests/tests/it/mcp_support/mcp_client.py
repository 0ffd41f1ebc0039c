"""An MCP client of the official Python SDK (PyPI `mcp`) against the
agentmesh MCP gateway, over Streamable HTTP. Run by
tests/tests/it/mcp_gateway.rs; prints one JSON object per step on stdout.

usage: mcp_client.py <scenario> <url>   (the token in MCP_TOKEN)

  calls  initialize, tools/list, call the allowed `code.search` twice and
         the denied `shell.exec` once in one session; then wait for
         notifications/tools/list_changed (the test registers a new tool
         once it reads `{"step": "waiting"}`) and list again.
  bad    no token, a wrong token, a malformed JSON-RPC body, an unknown
         method, a 10 MB argument; then a good call still works.
  slow   call `tests.run`, whose agent answers after the gateway's
         timeout; then a good call.
  bridged  against tools_server.py bridged into the mesh: tools/list, call
         `add` twice with the same arguments (`cache.toml` caches it), then
         `calls` (how many `add`/`echo` calls the server answered).
  learn  against tools_server.py bridged into the mesh: tools/list, call
         `learn` (the server adds `shout`), wait for
         notifications/tools/list_changed until `shout` is listed, call it.
"""

import asyncio
import json
import os
import sys

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def describe(error):
    """Every message of an exception and of those it groups or wraps."""
    parts = [f"{type(error).__name__}: {error}"]
    for inner in getattr(error, "exceptions", ()):
        parts.append(describe(inner))
    if error.__cause__ is not None:
        parts.append(describe(error.__cause__))
    return " | ".join(parts)


def result_fields(result):
    return {
        "is_error": bool(result.is_error),
        "text": "".join(c.text for c in result.content if getattr(c, "type", "") == "text"),
        "structured": result.structured_content,
        "meta": (result.model_dump(by_alias=True).get("_meta") or {}).get("io.agentmesh/call"),
    }


def tools_changed():
    """An event set by `notifications/tools/list_changed`, and the session's
    message handler that sets it."""
    changed = asyncio.Event()

    async def on_message(message):
        if getattr(getattr(message, "root", message), "method", None) == "notifications/tools/list_changed" or (
            "ToolListChanged" in type(getattr(message, "root", message)).__name__
        ):
            changed.set()

    return changed, on_message


async def calls(url, token):
    changed, on_message = tools_changed()
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write, message_handler=on_message) as session:
            init = await session.initialize()
            emit(
                "initialize",
                protocol_version=init.protocol_version,
                server=init.server_info.name,
                list_changed=bool(init.capabilities.tools and init.capabilities.tools.list_changed),
            )
            tools = await session.list_tools()
            emit("list", tools={t.name: t.input_schema for t in tools.tools})
            first = await session.call_tool("code.search", {"query": "parser"})
            emit("allowed", **result_fields(first))
            denied = await session.call_tool("shell.exec", {"cmd": "rm -rf /"})
            emit("denied", **result_fields(denied))
            second = await session.call_tool("code.search", {"query": "lexer"})
            emit("allowed_again", **result_fields(second))
            emit("waiting")
            await asyncio.wait_for(changed.wait(), timeout=60)
            tools = await session.list_tools()
            emit("changed", tools=sorted(t.name for t in tools.tools))


async def raw_post(http, url, body, headers):
    response = await http.post(
        url,
        content=body.encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
    )
    text = response.text
    payload = None
    try:
        payload = json.loads(text)
    except ValueError:
        for line in text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                try:
                    payload = json.loads(line[5:])
                except ValueError:
                    pass
    return response, payload


async def bad(url, token):
    auth = {"Authorization": f"Bearer {token}"}
    init = json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "0"}},
    })
    async with httpx2.AsyncClient(timeout=60) as http:
        for name, headers in [("no_token", {}), ("wrong_token", {"Authorization": "Bearer amt_wrong"})]:
            response, payload = await raw_post(http, url, init, headers)
            emit(name, status=response.status_code,
                 challenge=response.headers.get("www-authenticate"), body=payload)
        response, payload = await raw_post(http, url, "{this is not json", auth)
        emit("malformed", status=response.status_code, body=payload)
        response, payload = await raw_post(http, url, init, auth)
        session = response.headers.get("mcp-session-id")
        version = (payload or {}).get("result", {}).get("protocolVersion", "2025-11-25")
        headers = {**auth, "Mcp-Protocol-Version": version}
        if session:
            headers["Mcp-Session-Id"] = session
        await raw_post(http, url, json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), headers)
        response, payload = await raw_post(
            http, url, json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/teleport", "params": {}}), headers
        )
        emit("unknown_method", status=response.status_code, body=payload)

    # The SDK raises what the transport or the server said, from the call or
    # from the transport's task group.
    try:
        http = create_mcp_http_client(headers=auth)
        async with http, streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=60) as session:
                await session.initialize()
                big = await session.call_tool("code.search", {"query": "x" * (10 * 1024 * 1024)})
                emit("big", outcome="result", **result_fields(big))
    except Exception as e:
        emit("big", outcome="error", error=describe(e))
    # The gateway keeps serving: a fresh session's call works.
    http = create_mcp_http_client(headers=auth)
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            after = await session.call_tool("code.search", {"query": "after"})
            emit("after", **result_fields(after))


async def slow(url, token):
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            emit("slow", **result_fields(await session.call_tool("tests.run", {})))
            emit("after", **result_fields(await session.call_tool("code.search", {"query": "q"})))


async def bridged(url, token):
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            emit("list", tools={t.name: t.input_schema for t in tools.tools})
            emit("first", **result_fields(await session.call_tool("add", {"a": 2, "b": 3})))
            emit("repeat", **result_fields(await session.call_tool("add", {"a": 2, "b": 3})))
            emit("calls", **result_fields(await session.call_tool("calls", {})))


async def learn(url, token):
    changed, on_message = tools_changed()
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write, message_handler=on_message) as session:
            await session.initialize()
            names = sorted(t.name for t in (await session.list_tools()).tools)
            emit("before", tools=names)
            emit("learn", **result_fields(await session.call_tool("learn", {})))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while "shout" not in names:
                await asyncio.wait_for(changed.wait(), timeout=max(0.1, deadline - loop.time()))
                changed.clear()
                names = sorted(t.name for t in (await session.list_tools()).tools)
            emit("after", tools=names)
            emit("shout", **result_fields(await session.call_tool("shout", {"text": "hey"})))


def main():
    scenario, url = sys.argv[1], sys.argv[2]
    token = os.environ.get("MCP_TOKEN", "")
    asyncio.run({"calls": calls, "bad": bad, "slow": slow, "bridged": bridged, "learn": learn}[scenario](url, token))


if __name__ == "__main__":
    main()
