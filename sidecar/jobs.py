"""One request's life: its context for handlers, its events, and the rule that ends it.

Every request becomes a Job. Handlers see it through the `handlers.context.Context` face:
`progress`, `token`, `log`, `drain`, `cancelled`, `check_cancelled`. Its `finish` is the only
way a response is written, and it enforces the invariant once for everything: exactly one final
response per request, and no event after it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

from protocol.errors import Cancelled, RpcError
from protocol.messages import LogEvent, ProgressEvent, RequestId, TokenEvent
from sidecar import wire

if TYPE_CHECKING:
    from protocol.methods import MethodContract
    from sidecar.server import Server

PROGRESS_INTERVAL_S = 0.1


class Job:
    def __init__(self, server: "Server", request_id: RequestId, method: str, contract: "MethodContract", params: Any) -> None:
        self.server = server
        self.services = server.services
        self.id = request_id
        self.method = method
        self.contract = contract
        self.params = params
        self.state = "new"
        self.created = time.time()
        self.started: float | None = None
        self.position: int | None = None
        self.stage: str | None = None
        self.step: int | None = None
        self.total: int | None = None
        self.pid: int | None = None
        self.task: asyncio.Task | None = None
        self.cancelled = threading.Event()
        self.on_cancel: list[Any] = []
        self._loop = server.loop
        self._loop_thread = threading.get_ident()
        self._seq = 0
        self._finished = False
        self._last_sent_at = 0.0
        self._pending_progress: ProgressEvent | None = None
        self._flush_handle: asyncio.TimerHandle | None = None

    # ----- the handler-facing context

    def progress(
        self,
        stage: str,
        step: int | None = None,
        total: int | None = None,
        message: str | None = None,
        metrics: dict[str, float] | None = None,
        position: int | None = None,
    ) -> None:
        event = ProgressEvent(self.id, stage, step, total, message, metrics, position)
        self._on_loop(self._progress, event)

    def token(self, text: str) -> None:
        if text:
            self._on_loop(self._token, text)

    def log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._on_loop(self._send_event, "$/log", LogEvent(self.id, level, message, data))  # type: ignore[arg-type]

    async def drain(self) -> None:
        await self.server.writer.drain()

    def check_cancelled(self, partial: dict[str, Any] | None = None) -> None:
        if self.cancelled.is_set():
            raise Cancelled(partial)

    # ----- lifecycle, on the loop thread

    @property
    def finished(self) -> bool:
        return self._finished

    def request_cancel(self) -> None:
        if self._finished or self.cancelled.is_set():
            return
        self.cancelled.set()
        for callback in self.on_cancel:
            callback()
        if self.state == "queued":
            self.finish(error=RpcError.cancelled({"stage": "queued"}))
        elif self.task is not None and self.contract.runs_in == "sidecar":
            self.task.cancel()

    def finish(self, result: Any = None, error: RpcError | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self.state = "done"
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pending_progress is not None:
            self._write_progress(self._pending_progress)
        if error is not None:
            frame = {"jsonrpc": "2.0", "id": self.id, "error": error.to_wire()}
        else:
            frame = {"jsonrpc": "2.0", "id": self.id, "result": result}
        try:
            encoded = wire.encode(frame)
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            encoded = wire.encode({"jsonrpc": "2.0", "id": self.id, "error": RpcError(-32603, f"could not encode the result: {exc}").to_wire()})
        self.server.writer.send(encoded)
        self.server.job_finished(self)

    # ----- internals

    def _on_loop(self, fn: Any, *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _send_event(self, method: str, params: Any) -> None:
        if not self._finished:
            self.server.writer.send(wire.encode({"jsonrpc": "2.0", "method": method, "params": params}))

    def _token(self, text: str) -> None:
        if self._finished:
            return
        self._send_event("$/token", TokenEvent(self.id, self._seq, text))
        self._seq += 1

    def _progress(self, event: ProgressEvent) -> None:
        if self._finished:
            return
        if event.stage == self.stage and event.step is not None and self.step is not None and event.step < self.step:
            return  # steps never go backwards within a stage
        new_stage = event.stage != self.stage
        self.stage, self.step, self.total = event.stage, event.step, event.total
        now = time.monotonic()
        is_last = event.step is not None and event.total is not None and event.step >= event.total
        if new_stage or is_last or now - self._last_sent_at >= PROGRESS_INTERVAL_S:
            if self._pending_progress is not None and new_stage:
                self._write_progress(self._pending_progress)
            self._pending_progress = None
            self._write_progress(event)
            return
        self._pending_progress = event
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_at(self._loop.time() + PROGRESS_INTERVAL_S - (now - self._last_sent_at), self._flush_progress)

    def _flush_progress(self) -> None:
        self._flush_handle = None
        if self._pending_progress is not None and not self._finished:
            event, self._pending_progress = self._pending_progress, None
            self._write_progress(event)

    def _write_progress(self, event: ProgressEvent) -> None:
        self._last_sent_at = time.monotonic()
        self._send_event("$/progress", event)
