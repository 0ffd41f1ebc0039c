"""A FastMCP server (the official Python `mcp` SDK: `MCPServer` since mcp 2,
`FastMCP` before) for the bridge's tests.

    tools_server.py stdio            serves MCP on stdin/stdout
    tools_server.py http PORT        serves Streamable HTTP on 127.0.0.1:PORT/mcp

Its tools: `add` and `echo` answer; `fail` raises (an MCP tool error);
`crash` ends the process in the middle of the call; `hang` never answers;
`calls` says how many calls this process has answered; `learn` adds the
tool `shout` at run time and sends `notifications/tools/list_changed`.
"""

import asyncio
import os
import sys

try:  # mcp 2.x: FastMCP is now `MCPServer`
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as FastMCP
    from mcp.server.mcpserver.exceptions import ToolError

    V2 = True
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.exceptions import ToolError

    V2 = False

HTTP = len(sys.argv) > 2 and sys.argv[1] == "http"
PORT = int(sys.argv[2]) if HTTP else 0

if V2:
    mcp = FastMCP("tools", log_level="WARNING")
else:
    mcp = FastMCP("tools", host="127.0.0.1", port=PORT, log_level="WARNING")

answered = 0


@mcp.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    global answered
    answered += 1
    return a + b


@mcp.tool()
def echo(text: str) -> str:
    """Returns the text."""
    global answered
    answered += 1
    return text


@mcp.tool()
def fail(message: str) -> str:
    """Always fails with the message."""
    raise ToolError(message)


@mcp.tool()
def crash() -> str:
    """Ends the server's process in the middle of the call."""
    sys.stderr.write("tools_server: crashing on purpose\n")
    sys.stderr.flush()
    os._exit(3)


@mcp.tool()
async def hang() -> str:
    """Never answers."""
    await asyncio.sleep(3600)
    return "too late"


@mcp.tool()
def calls() -> int:
    """How many calls of `add` and `echo` this process has answered."""
    return answered


def shout(text: str) -> str:
    """Returns the text in capitals."""
    return text.upper()


@mcp.tool()
async def learn(ctx: Context) -> str:
    """Adds the tool `shout` to this server and tells the client."""
    mcp.add_tool(shout)
    # Sessions of the handshake era (what the bridge opens) get the
    # notification on their stream; 2026-07-28 clients on their
    # `subscriptions/listen` stream.
    await ctx.session.send_tool_list_changed()
    if hasattr(ctx, "notify_tools_changed"):
        await ctx.notify_tools_changed()
    return "learned `shout`"


if __name__ == "__main__":
    if HTTP and V2:
        mcp.run(transport="streamable-http", host="127.0.0.1", port=PORT)
    elif HTTP:
        mcp.run(transport="streamable-http")
    else:
        mcp.run()
