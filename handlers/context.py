"""The face handlers see: a request's context and the services behind it.

Handlers never write to stdout and never import sidecar/; they get everything through this.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from protocol.messages import RequestId


class Services(Protocol):
    config: Any
    registry: Any
    paths: Any
    models: Any
    pool: Any  # None inside worker processes


class Context(Protocol):
    id: RequestId
    method: str
    services: Services
    cancelled: threading.Event

    def progress(self, stage: str, step: int | None = None, total: int | None = None, message: str | None = None,
                 metrics: dict[str, float] | None = None) -> None: ...

    def token(self, text: str) -> None: ...

    def log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def check_cancelled(self, partial: dict[str, Any] | None = None) -> None: ...
