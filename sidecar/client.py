"""A small synchronous client that spawns `python -m sidecar` and speaks the protocol over real pipes.

Used by `call`, `demo`, the end-to-end tests and the benchmarks; host apps use the Swift and Node
clients, or their own few lines.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

Message = dict[str, Any]


class SidecarError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.data = error.get("data")
        self.error = error


class SidecarProcess:
    def __init__(self, args: list[str] | tuple[str, ...] = (), *, env: dict[str, str] | None = None,
                 cwd: str | None = None, stderr: Any = None, new_session: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=stderr, env=env, cwd=cwd, bufsize=0, start_new_session=new_session,
        )
        self._ids = itertools.count(1)
        self._buffer = b""
        self.backlog: list[Message] = []

    def send(self, message: Message) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params or {}})

    def start(self, method: str, params: dict[str, Any] | None = None, request_id: Any = None) -> Any:
        request_id = next(self._ids) if request_id is None else request_id
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}})
        return request_id

    def read(self) -> Message | None:
        """The next message from the sidecar, or None at end of output."""
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def messages(self) -> Iterator[Message]:
        while (message := self.read()) is not None:
            yield message

    def wait_response(self, request_id: Any, on_event: Callable[[Message], None] | None = None) -> Message:
        """Read until the response to request_id; events go to on_event, other responses to backlog."""
        for index, message in enumerate(self.backlog):
            if message.get("id") == request_id:
                return self.backlog.pop(index)
        for message in self.messages():
            if "method" in message:
                if on_event is not None:
                    on_event(message)
                continue
            if message.get("id") == request_id:
                return message
            self.backlog.append(message)
        raise EOFError(f"the sidecar closed its output before answering request {request_id!r}")

    def request(self, method: str, params: dict[str, Any] | None = None,
                on_event: Callable[[Message], None] | None = None) -> Any:
        response = self.wait_response(self.start(method, params), on_event)
        if "error" in response:
            raise SidecarError(response["error"])
        return response["result"]

    def close(self, timeout: float = 30.0) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> "SidecarProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
