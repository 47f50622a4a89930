"""Turn exceptions from handlers and runtimes into the protocol's errors, in one place."""

from __future__ import annotations

import errno
import re
import traceback
from typing import Any

import msgspec

from protocol.errors import Cancelled, ErrorCode, RpcError


def validation_error(exc: msgspec.ValidationError, prefix: str = "") -> RpcError:
    """-32602 naming the field, from msgspec's message ('... - at `$.a.b`' / 'unknown field `c`')."""
    text = str(exc)
    reason, _, where = text.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").lstrip(".") if where else ""
    for marker in ("unknown field `", "missing required field `"):
        if marker in reason:
            name = reason.split(marker, 1)[1].split("`", 1)[0]
            path = f"{path}.{name}" if path else name
    field = ".".join(part for part in (prefix, path) if part) or prefix or "params"
    return RpcError.invalid_params(field, reason)


_FULL_WORDS = ("no space left", "not enough free space", "disk is full", "disk quota")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk, without errno


def _disk_full(exc: BaseException) -> BaseException | None:
    """The exception in the chain that says the disk is full: ENOSPC/EDQUOT, or a library's words for it
    (numpy's 'Not enough free space', sqlite's 'database or disk is full') on an OSError without errno."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        if isinstance(current, (OSError, RuntimeError)) and any(w in str(current).lower() for w in _FULL_WORDS):
            return current
        if isinstance(current, OSError) and current.errno is None and _SHORT_WRITE.search(str(current)):
            return current
        current = current.__cause__ or current.__context__
    return None


def error_from_exception(exc: BaseException) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, Cancelled):
        return RpcError.cancelled(exc.partial)
    if isinstance(exc, msgspec.ValidationError):
        return validation_error(exc, "params")
    kind = getattr(exc, "error_kind", None)
    if kind:
        detail: dict[str, Any] = dict(getattr(exc, "error_detail", {}) or {})
        return RpcError.failed(kind, str(exc), retryable=bool(getattr(exc, "retryable", False)), **detail)
    if isinstance(exc, MemoryError):
        return RpcError.failed("out_of_memory", "ran out of memory; free memory (models/unload) or use a smaller model or batch", retryable=True)
    if isinstance(exc, FileNotFoundError):
        return RpcError.failed("file_not_found", f"{exc.filename or exc}: no such file or directory", path=str(exc.filename or ""))
    full = _disk_full(exc)
    if full is not None:
        where = getattr(full, "filename", None) or ""
        return RpcError.failed("disk_full", f"no space left on the device{': ' + str(where) if where else ''} ({full}); "
                               "free disk space and retry", retryable=True)
    return RpcError(
        ErrorCode.INTERNAL_ERROR,
        f"internal error: {type(exc).__name__}: {exc}",
        {"kind": "internal", "retryable": False, "detail": {"traceback": traceback.format_exception(exc)[-6:]}},
    )
