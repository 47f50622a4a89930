"""Baseline for bench/protocol.py: a minimal MCP server served over stdio the SDK's standard way.

`MCPServer` (FastMCP before mcp 2.x) with one trivial tool, run with `server.run()` (transport
"stdio", the default). The benchmark talks to it with the initialize handshake, then pings.
"""

from mcp.server.mcpserver import MCPServer

server = MCPServer("bench-ping")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


if __name__ == "__main__":
    server.run()
