"""Protocol versions, negotiated at `initialize` the way MCP does it."""

PROTOCOL_VERSION = "2026-11-01"
SUPPORTED_VERSIONS: tuple[str, ...] = (PROTOCOL_VERSION,)
