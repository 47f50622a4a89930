"""The small face every engine shows the pool and the handlers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ProgressFn = Callable[[int, int, str], None]


class LoadedModel(Protocol):
    runtime: str
    device: str
    dtype: str
    memory_bytes: int

    def close(self) -> None:
        """Free the model's memory now (the pool calls it when it unloads or evicts)."""


class Runtime(Protocol):
    name: str

    def can_load(self, path: Path) -> bool: ...

    def estimate_bytes(self, path: Path, options: dict[str, Any]) -> int:
        """What loading will cost, known before loading, so the pool can evict first."""

    def load(self, path: Path, options: dict[str, Any], progress: ProgressFn) -> LoadedModel: ...


class UnsupportedModel(Exception):
    error_kind = "unsupported_model"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.error_detail = detail
