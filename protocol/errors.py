"""Error codes and the one exception type that carries them to the wire."""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Literal


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    BUSY = -32001
    NOT_INITIALIZED = -32002
    CANCELLED = -32800
    REQUEST_FAILED = -32803


ErrorKind = Literal[
    "model_not_found",
    "unsupported_model",
    "unsupported_device",
    "dataset_invalid",
    "out_of_memory",
    "disk_full",
    "path_not_allowed",
    "worker_crashed",
    "timeout",
    "shutting_down",
    "artifact_exists",
    "artifact_not_found",
    "file_not_found",
    "prompt_too_long",
    "input_too_long",
    "input_empty",
    "no_chat_template",
    "adapter_invalid",
    "checkpoint_invalid",
    "adapter_mismatch",
    "verification_failed",
    "registry_unavailable",
    "result_too_large",
    "internal",
]


class RpcError(Exception):
    """Raised anywhere below the dispatcher; becomes exactly one error response."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @classmethod
    def failed(cls, kind: str, message: str, *, retryable: bool = False, **detail: Any) -> "RpcError":
        """A -32803 'request failed' error with the data shape PROTOCOL.md fixes."""
        return cls(ErrorCode.REQUEST_FAILED, message, {"kind": kind, "retryable": retryable, "detail": detail})

    @classmethod
    def invalid_params(cls, field: str, reason: str) -> "RpcError":
        return cls(ErrorCode.INVALID_PARAMS, f"invalid params: {field}: {reason}", {"field": field, "reason": reason})

    @classmethod
    def cancelled(cls, partial: dict[str, Any] | None = None) -> "RpcError":
        return cls(ErrorCode.CANCELLED, "request cancelled", {"partial": partial or {}})


class Cancelled(Exception):
    """Raised by a job that noticed its cancellation; carries what it finished so far."""

    def __init__(self, partial: dict[str, Any] | None = None) -> None:
        super().__init__("cancelled")
        self.partial = partial or {}
