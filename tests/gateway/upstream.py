"""A small upstream MCP server over stdio (or streamable HTTP with `--http PORT`, answering with event streams, or plain JSON with `--json`) for the gateway's tests: five tools, each call
(its tool, arguments and JSON-RPC request id) appended as a JSON line to the file named by UPSTREAM_CALLS (so a test sees what reached it), its
pid appended to UPSTREAM_CALLS.pid at each start; over HTTP, each call's client port (its TCP connection) to UPSTREAM_CALLS.ports."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata

TOOLS = [
    types.Tool(name="echo", description="Echoes its text.",
               input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
    types.Tool(name="delete", description="Deletes a file.",
               input_schema={"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
    types.Tool(name="hang", description="Never answers.", input_schema={"type": "object"}),
    types.Tool(name="crash", description="Exits without answering.", input_schema={"type": "object"}),
    types.Tool(name="pay", description="Sends money.",
               input_schema={"type": "object", "properties": {"to": {"type": "string"}, "amount": {"type": "number"}},
                             "required": ["to", "amount"]}),
]


def record(name: str, arguments: dict[str, Any], request_id: Any, client: Any = None) -> None:
    with open(os.environ["UPSTREAM_CALLS"], "a") as f:
        f.write(json.dumps({"tool": name, "arguments": arguments, "request_id": request_id}) + "\n")
    if client is not None:  # over HTTP: the TCP connection the call came on (its client port)
        with open(os.environ["UPSTREAM_CALLS"] + ".ports", "a") as f:
            f.write(f"{client.port}\n")


async def list_tools(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    record(params.name, args, ctx.request_id, getattr(ctx.request, "client", None))
    if params.name == "echo":
        text = str(args.get("text", ""))
        if text == "chatty":  # request-scoped traffic on the call's stream before the answer
            text = await chatter(ctx)
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"echo: {text}")],
                                    structured_content={"echoed": text, "length": len(text)})
    if params.name == "delete":
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"deleted {args.get('path')}")])
    if params.name == "hang":  # never answers; its cancellation is appended to UPSTREAM_CALLS.cancelled
        try:
            await anyio.sleep_forever()
        finally:
            with open(os.environ["UPSTREAM_CALLS"] + ".cancelled", "a") as f:
                f.write(json.dumps(ctx.request_id) + "\n")
    if params.name == "crash":  # dies mid-call, answering nothing
        os._exit(3)
    if params.name == "pay":
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"paid {args.get('amount')} to {args.get('to')}")])
    return types.CallToolResult(content=[types.TextContent(type="text", text="no such tool")], is_error=True)


async def chatter(ctx: ServerRequestContext[Any]) -> str:
    """A log message, a ping and an elicitation, each sent on the call's own stream."""
    related = ServerMessageMetadata(related_request_id=ctx.request_id)
    await ctx.session.send_log_message("info", "working on it", related_request_id=ctx.request_id)
    await ctx.session.send_request(types.PingRequest(), types.EmptyResult, metadata=related)
    try:
        await ctx.session.send_request(types.ElicitRequest(params=types.ElicitRequestFormParams(
            message="Sure?", requested_schema={"type": "object", "properties": {}})), types.ElicitResult,
            metadata=related)
    except MCPError:
        return "chatty (pinged; elicitation refused)"
    return "chatty (pinged; elicitation answered)"


async def main() -> None:
    with open(os.environ["UPSTREAM_CALLS"] + ".pid", "a") as f:  # every start, so a test can kill it
        f.write(f"{os.getpid()}\n")
    server: Server[Any] = Server("test-upstream", on_list_tools=list_tools, on_call_tool=call_tool)
    if len(sys.argv) >= 3 and sys.argv[1] == "--http":  # streamable HTTP on 127.0.0.1:<port>/mcp
        app = server.streamable_http_app(json_response="--json" in sys.argv[3:])  # else event streams
        config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
        await uvicorn.Server(config).serve()
        return
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
