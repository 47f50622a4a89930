"""How loaded the machine was while a model was measured: other processes' CPU time and the load average.

A benchmark taken while other work ran is slower and noisier; the row says so instead of passing the
numbers off as the model's. Linux (/proc); elsewhere the fields are None and `busy` is False.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_FOREIGN_CPUS = 0.25  # other processes' CPU use (in CPUs) from which a row is marked busy


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Snapshot:
    at: float
    busy_ticks: int | None  # the whole machine's non-idle time
    own_ticks: int | None   # this process's (all threads)


def _busy_ticks() -> int | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, _steal = values
    return user + nice + system + irq + softirq


def _own_ticks() -> int | None:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def snapshot() -> Snapshot:
    return Snapshot(time.perf_counter(), _busy_ticks(), _own_ticks())


def load_avg_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def foreign_cpus(before: Snapshot, after: Snapshot) -> float | None:
    """CPUs' worth of time other processes used between the snapshots."""
    seconds = after.at - before.at
    if None in (before.busy_ticks, after.busy_ticks, before.own_ticks, after.own_ticks) or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    other = (after.busy_ticks - before.busy_ticks) - (after.own_ticks - before.own_ticks)  # type: ignore[operator]
    return round(max(0.0, other / hz / seconds), 3)


def describe(before: Snapshot, after: Snapshot) -> dict:
    """The row's `machine` record."""
    cpus = cpu_count()
    foreign = foreign_cpus(before, after)
    busy = foreign is not None and foreign >= BUSY_FOREIGN_CPUS
    note = (f"other processes used {foreign:.2f} of {cpus} CPUs while this model was measured: its numbers are "
            "slower and noisier than on an idle machine") if busy else None
    return {"cpus": cpus, "foreign_cpus": foreign, "load_avg_1m": load_avg_1m(), "busy": busy, "note": note}
