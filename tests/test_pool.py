"""The model pool with a fake runtime: single-flight, leases, LRU eviction, keep-alive."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protocol.keep_alive import DEFAULT_KEEP_ALIVE_S, InvalidKeepAlive, parse_keep_alive
from sidecar.pool import ModelPool


@dataclass
class FakeModel:
    memory_bytes: int
    runtime: str = "fake"
    device: str = "cpu"
    dtype: str = "float32"
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeRuntime:
    size: int = 100
    name: str = "fake"
    loads: list = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    def estimate_bytes(self, path, options):
        return self.size

    def load(self, path, options, progress):
        self.loads.append(str(path))
        progress(0, 1, "loading")
        self.gate.wait(5)
        progress(1, 1, "loaded")
        return FakeModel(self.size)


@pytest.mark.parametrize("value,seconds", [
    (None, DEFAULT_KEEP_ALIVE_S), (0, 0.0), ("0", 0.0), (30, 30.0), ("30", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("250ms", 0.25), ("1.5s", 1.5), (-1, None), ("-1", None), ("-5m", None), ("inf", None), (float("inf"), None),
])
def test_parse_keep_alive(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "5x", "", "nan", float("nan")])
def test_parse_keep_alive_refuses_nonsense(value):
    with pytest.raises(InvalidKeepAlive):
        parse_keep_alive(value)


def test_single_flight_loading_and_progress_fan_out():
    async def scenario():
        runtime, pool = FakeRuntime(), ModelPool(1000)
        seen_a, seen_b = [], []
        a = asyncio.create_task(pool.acquire("m", Path("/m"), runtime, {}, progress=lambda *p: seen_a.append(p)))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(pool.acquire("m", Path("/m"), runtime, {}, progress=lambda *p: seen_b.append(p)))
        await asyncio.sleep(0.05)
        assert pool.info().loading == ["m"]
        runtime.gate.set()
        lease_a, lease_b = await a, await b
        assert runtime.loads == ["/m"] and lease_a.entry is lease_b.entry and lease_a.entry.refs == 2
        assert (1, 1, "loaded") in seen_a and (1, 1, "loaded") in seen_b
        lease_a.release()
        lease_b.release()
        assert pool.models()[0].in_use == 0

    asyncio.run(scenario())


def test_different_options_are_different_entries():
    async def scenario():
        runtime, pool = FakeRuntime(), ModelPool(1000)
        runtime.gate.set()
        (await pool.acquire("m", "/m", runtime, {"dtype": "float32"})).release()
        (await pool.acquire("m", "/m", runtime, {"dtype": "float16"})).release()
        assert len(pool.models()) == 2 and len(runtime.loads) == 2

    asyncio.run(scenario())


def test_lru_eviction_never_takes_a_model_in_use():
    async def scenario():
        runtime, pool = FakeRuntime(size=400), ModelPool(1000)
        runtime.gate.set()
        held = await pool.acquire("a", "/a", runtime, {})
        (await pool.acquire("b", "/b", runtime, {})).release()
        (await pool.acquire("c", "/c", runtime, {})).release()  # needs room: b (idle) goes, a (held) stays
        assert sorted(e.model for e in pool.models()) == ["a", "c"]
        warnings = []
        await pool.acquire("d", "/d", runtime, {}, warn=warnings.append)  # c goes; a still held
        assert sorted(e.model for e in pool.models()) == ["a", "d"]
        await pool.acquire("e", "/e", runtime, {}, warn=warnings.append)  # all in use: over budget, warned
        assert warnings and "over its budget" in warnings[-1]
        held.release()

    asyncio.run(scenario())


def test_keep_alive_zero_unloads_when_the_last_lease_ends_and_negative_keeps():
    async def scenario():
        runtime, pool = FakeRuntime(), ModelPool(1000)
        runtime.gate.set()
        lease = await pool.acquire("m", "/m", runtime, {}, keep_alive=0)
        model = lease.model
        lease.release()
        await asyncio.sleep(0.05)
        assert pool.models() == [] and model.closed
        (await pool.acquire("k", "/k", runtime, {}, keep_alive=-1)).release()
        (await pool.acquire("t", "/t", runtime, {}, keep_alive="100ms")).release()
        info = {m.model: m for m in pool.models()}
        assert info["k"].expires_at is None and info["t"].expires_at is not None
        await asyncio.sleep(0.3)
        assert [m.model for m in pool.models()] == ["k"]

    asyncio.run(scenario())


def test_unload_waits_for_the_request_using_the_model():
    async def scenario():
        runtime, pool = FakeRuntime(), ModelPool(1000)
        runtime.gate.set()
        lease = await pool.acquire("m", "/m", runtime, {})
        unloading = asyncio.create_task(pool.unload("/m"))
        await asyncio.sleep(0.05)
        assert not unloading.done()
        lease.release()
        unloaded = await unloading
        assert [u.model for u in unloaded] == ["m"] and pool.models() == []

    asyncio.run(scenario())


def test_a_load_nobody_waits_for_any_more_still_expires():
    async def scenario():
        runtime, pool = FakeRuntime(), ModelPool(1000)
        waiter = asyncio.create_task(pool.acquire("m", "/m", runtime, {}))
        await asyncio.sleep(0.05)
        waiter.cancel()
        runtime.gate.set()
        await asyncio.sleep(0.1)
        [entry] = pool.models()
        assert entry.in_use == 0 and entry.expires_at is not None

    asyncio.run(scenario())


def test_a_model_larger_than_the_budget_says_so():
    async def scenario():
        runtime, pool = FakeRuntime(size=2000), ModelPool(1000)
        runtime.gate.set()
        warnings = []
        (await pool.acquire("m", "/m", runtime, {}, warn=warnings.append)).release()
        assert "alone is larger than the budget" in warnings[0]

    asyncio.run(scenario())
