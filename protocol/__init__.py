"""The wire contract: message types, error codes and the protocol version. Imports nothing heavy."""

from protocol.errors import ErrorCode, ErrorKind, RpcError
from protocol.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

__all__ = ["ErrorCode", "ErrorKind", "RpcError", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS"]
