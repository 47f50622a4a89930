"""The model pool: loaded models shared by requests, generic over runtimes.

- Entries are keyed by resolved path + runtime + load options.
- Loading is single-flight: concurrent requests for one key wait on the same load (and all see
  its progress).
- A lease holds a reference; a model in use is never evicted or unloaded under a request.
- Least-recently-used models with no lease are evicted to stay under the memory budget.
- keep_alive follows Ollama: a duration ("5m", "1h30m", "250ms") or seconds; 0 unloads as soon as
  the request ends; a negative value keeps the model loaded until asked.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import messages as m
from protocol.keep_alive import DEFAULT_KEEP_ALIVE_S, parse_keep_alive
from runtimes.base import LoadedModel, Runtime

log = logging.getLogger("sidecar.pool")

Progress = Callable[[int, int, str], None]


@dataclass
class PoolEntry:
    key: tuple
    reference: str
    path: str
    runtime: str
    model: LoadedModel
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    refs: int = 0
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S
    expiry: asyncio.TimerHandle | None = None
    expires_at: float | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request at a time computes on a model
    engine: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))

    def info(self) -> m.ModelInfo:
        return m.ModelInfo(
            model=self.reference, path=self.path, runtime=self.runtime, device=self.model.device,
            dtype=self.model.dtype, memory_bytes=self.model.memory_bytes, in_use=self.refs,
            loaded_at=self.loaded_at, keep_alive_s=self.keep_alive_s, expires_at=self.expires_at,
            adapters=list(getattr(self.model, "adapters", []) or []),
        )


@dataclass
class _Loading:
    task: asyncio.Task
    reference: str
    listeners: list[Progress] = field(default_factory=list)


class Lease:
    """A reference on a pooled model for the length of one request (async context manager)."""

    def __init__(self, pool: "ModelPool", entry: PoolEntry) -> None:
        self._pool = pool
        self.entry = entry
        self.model = entry.model
        self._released = False

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self.entry)


class ModelPool:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: dict[tuple, PoolEntry] = {}
        self._loading: dict[tuple, _Loading] = {}
        self._closed = False

    # ----- leasing

    async def acquire(self, reference: str, path: Any, runtime: Runtime, options: dict[str, Any],
                      keep_alive: str | int | float | None = None, progress: Progress | None = None,
                      warn: Callable[[str], None] | None = None) -> Lease:
        keep_alive_s = parse_keep_alive(keep_alive)
        key = (str(path), runtime.name, tuple(sorted((k, v) for k, v in options.items() if v is not None)))
        entry = self._entries.get(key)
        if entry is None:
            loading = self._loading.get(key)
            if loading is None:
                task = asyncio.get_running_loop().create_task(self._load(key, reference, path, runtime, options, warn))
                loading = self._loading[key] = _Loading(task, reference)
                task.add_done_callback(lambda _t: self._loading.pop(key, None))
            if progress is not None:
                loading.listeners.append(progress)
            entry = await asyncio.shield(loading.task)
        entry.refs += 1
        entry.last_used = time.monotonic()
        entry.keep_alive_s = keep_alive_s
        entry.released.clear()
        self._cancel_expiry(entry)
        return Lease(self, entry)

    async def _load(self, key: tuple, reference: str, path: Any, runtime: Runtime, options: dict[str, Any],
                    warn: Callable[[str], None] | None) -> PoolEntry:
        # One thread per model for everything that touches the engine: OpenMP (torch, llama.cpp) keeps its
        # fast spinning barriers only while a single thread calls in; hopping threads halves decode speed.
        engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{Path(str(path)).name}")
        estimate = runtime.estimate_bytes(path, options)
        self._make_room(estimate, warn)

        def fan_out(step: int, total: int, message: str) -> None:
            loading = self._loading.get(key)
            for listener in list(loading.listeners if loading else ()):
                listener(step, total, message)

        try:
            model = await asyncio.get_running_loop().run_in_executor(engine, runtime.load, path, options, fan_out)
        except BaseException:
            engine.shutdown(wait=False)
            raise
        entry = PoolEntry(key, reference, str(path), runtime.name, model, engine=engine)
        self._entries[key] = entry
        self._make_room(0, warn, keep=entry)
        self._schedule_expiry(entry)  # if every waiter was cancelled, the model still goes when its time is up
        return entry

    def _release(self, entry: PoolEntry) -> None:
        entry.refs -= 1
        entry.last_used = time.monotonic()
        if entry.refs > 0:
            return
        entry.released.set()
        if entry.keep_alive_s is None:
            return
        if entry.keep_alive_s == 0:
            self._unload(entry)
            return
        self._schedule_expiry(entry)

    def _schedule_expiry(self, entry: PoolEntry) -> None:
        self._cancel_expiry(entry)
        if entry.keep_alive_s is None:
            return
        entry.expires_at = time.time() + entry.keep_alive_s
        entry.expiry = asyncio.get_running_loop().call_later(entry.keep_alive_s, self._expire, entry)

    def _expire(self, entry: PoolEntry) -> None:
        if entry.refs == 0 and self._entries.get(entry.key) is entry:
            log.info("keep-alive expired: unloading %s", entry.reference)
            self._unload(entry)

    @staticmethod
    def _cancel_expiry(entry: PoolEntry) -> None:
        if entry.expiry is not None:
            entry.expiry.cancel()
        entry.expiry = None
        entry.expires_at = None

    # ----- memory

    @property
    def used_bytes(self) -> int:
        return sum(e.model.memory_bytes for e in self._entries.values())

    def _make_room(self, needed: int, warn: Callable[[str], None] | None, keep: PoolEntry | None = None) -> None:
        idle = sorted((e for e in self._entries.values() if e.refs == 0 and e is not keep), key=lambda e: e.last_used)
        while self.used_bytes + needed > self.budget_bytes and idle:
            victim = idle.pop(0)
            log.info("evicting %s to stay under the pool budget", victim.reference)
            self._unload(victim)
        if self.used_bytes + needed > self.budget_bytes and warn is not None:
            if any(e is not keep for e in self._entries.values()):
                reason = "because every other loaded model is in use"
            else:
                reason = "because this model alone is larger than the budget (raise --pool-budget)"
            warn(f"the model pool is over its budget ({self.used_bytes + needed} > {self.budget_bytes} bytes) {reason}")

    def _unload(self, entry: PoolEntry) -> asyncio.Future:
        """Drop the entry now; free its memory on its engine thread so the loop (and ping) never waits on it."""
        self._cancel_expiry(entry)
        loop = asyncio.get_running_loop()
        if self._entries.get(entry.key) is not entry:  # unloaded already
            done = loop.create_future()
            done.set_result(None)
            return done
        del self._entries[entry.key]
        closing = loop.run_in_executor(entry.engine, entry.model.close)
        entry.engine.shutdown(wait=False)  # runs the queued close, then the thread ends
        return closing

    # ----- methods behind models/* and status

    def models(self) -> list[m.ModelInfo]:
        return [e.info() for e in self._entries.values()]

    def info(self) -> m.PoolInfo:
        return m.PoolInfo(self.budget_bytes, self.used_bytes, [l.reference for l in self._loading.values()])

    async def unload(self, path: str, runtime: str = "any") -> list[m.ModelInfo]:
        """Unload every entry of `path` (and runtime), waiting for the requests that use it to end."""
        matching = [e for e in self._entries.values() if e.path == path and runtime in ("any", e.runtime)]
        unloaded = []
        for entry in matching:
            entry.keep_alive_s = 0.0
            while entry.refs > 0:
                await entry.released.wait()
            self._cancel_expiry(entry)
            info = entry.info()
            await self._unload(entry)
            unloaded.append(info)
        return unloaded

    async def close(self) -> None:
        await asyncio.gather(*(self._unload(entry) for entry in list(self._entries.values())))
