"""How many compute threads a job should use right now: its ceiling, less the cores other programs keep busy.

Spin-waiting thread pools (OpenMP in torch, ggml's barrier in llama.cpp) are fastest on idle cores and
collapse when another program takes one: a spinning thread burns the time slice its descheduled peer
needs, and a fair-share slowdown becomes 10x. Sleeping waits (OMP_WAIT_POLICY=PASSIVE) avoid the collapse
but cost 61% of llama.cpp's idle decode speed. Running no more threads than there are cores nobody else
uses avoids it at no idle cost, so that is what a job does: a few times a second it reads how busy the
CPUs it may run on are (/proc/stat, less this process's own CPU time) and uses the cores left, at least
one, at most its ceiling, split between the jobs this process runs at once.

The sidecar (sidecar/threads.py) decides the ceiling and whether to adapt, and writes both into the
environment every worker inherits; without them (a runtime used as a library) nothing is changed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_THREADS = "MLSIDECAR_THREADS"  # the ceiling: compute threads per job
ENV_ADAPT = "MLSIDECAR_THREADS_ADAPT"  # "1": fewer threads while other programs keep cores busy
SAMPLE_EVERY_S = 0.25
FIRST_SAMPLE_S = 0.1  # a job's first look comes sooner: a neighbour's threads still spinning as it starts soon sleep
CONFIRM_S = 0.02  # a second glance at procs_running before a job starts on fewer threads: longer than a pool spins down
EVIDENCE_S = 0.5  # fewer threads need two agreeing samples this long together, or one twice as long: a burst is no
# reason to drop; more threads need one sample (a spinning pool waiting on a descheduled peer is the costly mistake,
# and a core that stays free is seen again at the next sample)


def _allowed_cpus() -> set[int] | None:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


class CpuClock:
    """Busy seconds of the CPUs we may run on (all programs), and this process's own CPU seconds."""

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self._path = stat_path
        self._allowed = _allowed_cpus()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @property
    def cpus(self) -> int:
        return len(self._allowed) if self._allowed else (os.cpu_count() or 1)

    def busy_seconds(self) -> float | None:
        """Time not idle (user, nice, system, irq, softirq, steal) summed over our CPUs; None without /proc."""
        try:
            with open(self._path, "rb") as f:
                text = f.read()
        except OSError:
            return None
        ticks = 0
        for line in text.split(b"\n"):
            if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                continue
            name, *fields = line.split()
            if self._allowed is not None and int(name[3:]) not in self._allowed:
                continue
            values = [int(v) for v in fields[:8]]
            ticks += sum(values) - values[3] - values[4]  # less idle and iowait
        return ticks / self._tick

    @staticmethod
    def own_seconds() -> float:
        return time.process_time()

    def runnable_elsewhere(self) -> int | None:
        """Threads of other programs that want a CPU right now (procs_running less our own runnable threads).

        None where that cannot be known for our CPUs: no /proc, or an affinity mask narrower than the
        machine (procs_running counts every CPU's queue)."""
        if self._allowed is not None and len(self._allowed) != (os.cpu_count() or 0):
            return None
        try:
            with open(self._path, "rb") as f:
                line = next((l for l in f.read().split(b"\n") if l.startswith(b"procs_running ")), None)
            ours = 0
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/stat", "rb") as f:
                    ours += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
        except (OSError, IndexError):
            return None
        return None if line is None else max(0, int(line.split()[1]) - max(1, ours))


@dataclass
class Reading:
    others_cores: float  # cores other programs kept busy over the last sample
    free_cores: float


class Governor:
    """One per process: samples the CPUs, and tells each running job how many threads it may use."""

    def __init__(self, ceiling: int, adaptive: bool, clock: CpuClock | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = max(1, ceiling)
        self.adaptive = adaptive
        self._clock = clock or CpuClock()
        self._now = now
        self._lock = threading.Lock()
        self._jobs = 0
        self._threads = self.ceiling  # threads this process may use, as last decided
        self._candidate: int | None = None
        self._evidence = 0.0  # seconds of samples that agree on the candidate
        self._samples = 0
        self._last: tuple[float, float, float] | None = None  # (wall, busy, own) at the last sample; set as a job starts
        self._interval = SAMPLE_EVERY_S
        self._first = False  # the next sample is a job's first: it decides either way at once
        self.reading: Reading | None = None

    def job(self, fixed: int | None = None) -> "Job":
        return Job(self, fixed)

    def _enter(self) -> None:
        """A job starts: it judges by who wants the CPUs now, not by the window since the last job.

        A short job (one embed request) has no second chance, so the count is set at once from
        procs_running; a drop is confirmed by a second glance 20 ms later, since another program's
        pool that has just finished spins for ~10 ms before it sleeps. Its first sample, a tenth of
        a second in, then decides either way."""
        elsewhere = self._clock.runnable_elsewhere() if self.adaptive else None
        if elsewhere and self._clock.cpus - elsewhere < self.ceiling:
            time.sleep(CONFIRM_S)
            again = self._clock.runnable_elsewhere()
            elsewhere = None if again is None else min(elsewhere, again)
        with self._lock:
            self._jobs += 1
            if not self.adaptive:
                return
            if elsewhere is not None:
                self._threads = max(1, min(self.ceiling, self._clock.cpus - elsewhere))
            busy = self._clock.busy_seconds()
            self._last = (self._now(), busy, self._clock.own_seconds()) if busy is not None else None
            self._interval, self._first = FIRST_SAMPLE_S, True
            self._candidate, self._evidence, self._samples = None, 0.0, 0

    def _leave(self) -> None:
        with self._lock:
            self._jobs = max(0, self._jobs - 1)

    def threads_per_job(self) -> int:
        """The cores left for us, split between our running jobs; re-sampled at most every SAMPLE_EVERY_S."""
        with self._lock:
            if not self.adaptive:
                return self.ceiling
            self._sample()
            return max(1, self._threads // max(1, self._jobs))

    def _sample(self) -> None:
        wall = self._now()
        if self._last is not None and wall - self._last[0] < self._interval:
            return
        self._interval = SAMPLE_EVERY_S
        busy, own = self._clock.busy_seconds(), self._clock.own_seconds()
        if busy is None:
            self.adaptive = False  # no /proc/stat here: keep the ceiling
            return
        last, self._last = self._last, (wall, busy, own)
        if last is None:
            return
        elapsed = wall - last[0]
        others = max(0.0, ((busy - last[1]) - (own - last[2])) / elapsed)
        free = max(1.0, min(float(self.ceiling), self._clock.cpus - others))
        self.reading = Reading(round(others, 2), round(free, 2))
        wanted = max(1, min(self.ceiling, round(free)))
        if wanted == self._threads:
            self._candidate, self._evidence, self._first = None, 0.0, False
            return
        if wanted > self._threads or self._first:  # more threads, or a job's own first look: at once
            self._threads, self._candidate, self._evidence, self._first = wanted, None, 0.0, False
            return
        if wanted != self._candidate:
            self._candidate, self._evidence, self._samples = wanted, 0.0, 0
        self._evidence += elapsed
        self._samples += 1
        if (self._samples >= 2 and self._evidence >= EVIDENCE_S) or elapsed >= 2 * EVIDENCE_S:
            self._threads, self._candidate, self._evidence = wanted, None, 0.0

    def snapshot(self) -> dict:
        """For `status`: the ceiling, what a job gets now, and the last reading."""
        with self._lock:
            now = max(1, self._threads // max(1, self._jobs)) if self.adaptive else self.ceiling
            reading = self.reading
        return {"threads_now": now, "others_busy_cores": reading.others_cores if reading and self.adaptive else None}


class Job:
    """A job's claim on the CPU while it computes; `changed()` is cheap enough to call every token."""

    def __init__(self, governor: Governor, fixed: int | None) -> None:
        self._governor = governor
        self.fixed = fixed
        self._managed = bool(fixed) or managed()
        self._applied: int | None = None

    def __enter__(self) -> "Job":
        self._governor._enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._governor._leave()

    def threads(self) -> int:
        return self.fixed or self._governor.threads_per_job()

    def changed(self) -> int | None:
        """The count to use when it differs from the one last returned here, else None (also when unmanaged)."""
        if not self._managed:
            return None
        wanted = self.threads()
        if wanted == self._applied:
            return None
        self._applied = wanted
        return wanted

    def apply_to(self, target: Any) -> None:
        """Hand the count to `target.set_threads` when it changed; call it between steps (tokens, batches)."""
        set_threads = getattr(target, "set_threads", None)
        if set_threads is not None and (count := self.changed()) is not None:
            set_threads(count)


class _Torch:
    """torch's intra-op pool as a thread-count target (per calling thread with OpenMP: call it where torch computes)."""

    @staticmethod
    def set_threads(count: int) -> None:
        import torch

        if torch.get_num_threads() != count:
            torch.set_num_threads(count)


TORCH = _Torch()


_governor: Governor | None = None
_governor_lock = threading.Lock()


def governor() -> Governor:
    """This process's governor, from the environment the sidecar set (no ceiling set: nothing adapts)."""
    global _governor
    with _governor_lock:
        if _governor is None:
            ceiling = os.environ.get(ENV_THREADS, "").strip()
            adaptive = os.environ.get(ENV_ADAPT) == "1" and ceiling.isdigit()
            _governor = Governor(int(ceiling) if ceiling.isdigit() else (os.cpu_count() or 1), adaptive)
        return _governor


def job(fixed: int | None = None) -> Job:
    """A claim on this process's share; `fixed` (a request's own thread count) turns adapting off for it."""
    return governor().job(fixed)


def managed() -> bool:
    """Whether the sidecar set a thread policy for this process (runtimes used as a library leave threads alone)."""
    return bool(os.environ.get(ENV_THREADS, "").strip().isdigit())
