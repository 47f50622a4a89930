"""The sidecar's thread policy: how many compute threads a job may use, whether that adapts, and how idle threads wait.

Users run the sidecar beside an editor, a browser and a compiler. OpenMP's default (spin-waiting
threads, one per logical CPU) turns a fair-share slowdown under such load into 10x or more: a
spinning thread burns the time slice that the thread it waits for needs. Sleeping idle threads
(MLSIDECAR_WAIT_POLICY=passive) recover that share but cost idle decode speed (61% on llama.cpp in
bench/contention.py). So the default keeps the libraries' fast waiting and removes the cause instead:
a job runs at most as many threads as the physical cores we may use (capped by a CPU quota), and
fewer while other programs keep cores busy (runtimes/cpu_share.py adapts the count between steps).
A count the user gives (--threads, MLSIDECAR_THREADS, OMP_NUM_THREADS, a request's `threads`) is
used as given. The policy is decided once, before torch or llama.cpp is imported, and written into
the environment, so every worker process inherits the same one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from runtimes.cpu_share import ENV_ADAPT, ENV_THREADS

ENV_WAIT = "MLSIDECAR_WAIT_POLICY"
ENV_APPLIED = "MLSIDECAR_THREAD_POLICY"  # the applied policy as JSON, for workers and `status`


@dataclass(frozen=True)
class ThreadPolicy:
    threads: int  # compute threads per job at most: torch's intra-op pool, llama.cpp's n_threads and n_threads_batch
    wait_policy: str  # OMP_WAIT_POLICY in force: PASSIVE (sleep when idle), ACTIVE (spin) or LIBRARY (their default)
    reason: str  # where the numbers came from, for `status` and `doctor`
    adaptive: bool = False  # fewer threads while other programs keep cores busy (the machine-chosen default)

    def to_dict(self) -> dict:
        return asdict(self)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo among the CPUs we may run on; None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, cpu, package = set(), None, "0"
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            cpu = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and (allowed is None or cpu in allowed):
            cores.add((package, value))
    return len(cores) or None


def cgroup_cpu_quota() -> float | None:
    """CPUs a container may use (cgroup v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            text = Path(quota_file).read_text().split()
            if period_file is None:
                quota, period = text[0], text[1]
            else:
                quota, period = text[0], Path(period_file).read_text().strip()
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    return None


def decide(env: dict[str, str] | None = None, requested: int | None = None) -> ThreadPolicy:
    """The policy from the flag (`requested`), the environment, then the machine."""
    env = dict(os.environ if env is None else env)
    # Default: the libraries' own waiting. PASSIVE cost 61% of llama.cpp's and 8% of transformers' idle
    # decode speed in bench/contention.py; adapting the thread count recovers the fair share without it.
    wait = (env.get(ENV_WAIT) or env.get("OMP_WAIT_POLICY") or "LIBRARY").upper()
    wait_reason = ("OMP_WAIT_POLICY" if env.get("OMP_WAIT_POLICY") and not env.get(ENV_WAIT) else
                   ENV_WAIT if env.get(ENV_WAIT) else "default: the libraries' own")
    if requested:
        return ThreadPolicy(max(1, requested), wait, f"--threads {requested}; wait policy from {wait_reason}")
    for name in (ENV_THREADS, "OMP_NUM_THREADS"):
        if env.get(name, "").strip().isdigit() and int(env[name]) > 0:
            return ThreadPolicy(int(env[name]), wait, f"{name}={env[name]}; wait policy from {wait_reason}")
    allowed = _affinity()
    physical = physical_cores()
    quota = cgroup_cpu_quota()
    threads, why = allowed, f"{allowed} CPUs in the affinity mask"
    if physical and physical < threads:
        threads, why = physical, f"{physical} physical cores (hyper-threads do not add matrix throughput)"
    if quota is not None and math.ceil(quota) < threads:
        threads, why = max(1, math.ceil(quota)), f"the container's CPU quota of {quota:g}"
    if env.get(ENV_ADAPT) == "0":
        return ThreadPolicy(threads, wait, f"{why}, fixed ({ENV_ADAPT}=0); wait policy from {wait_reason}")
    return ThreadPolicy(threads, wait, f"{why}, fewer while other programs keep cores busy; wait policy from "
                        f"{wait_reason}", adaptive=True)


def apply(policy: ThreadPolicy, env: dict | None = None) -> None:
    """Write the policy where torch, OpenMP, BLAS and our workers read it (before any of them loads)."""
    env = os.environ if env is None else env
    if policy.wait_policy == "LIBRARY":  # MLSIDECAR_WAIT_POLICY=library: the libraries' own default (benchmarks compare it)
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = policy.wait_policy
    for name in (ENV_THREADS, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(policy.threads)
    env[ENV_ADAPT] = "1" if policy.adaptive else "0"
    env[ENV_APPLIED] = json.dumps(policy.to_dict())


def current() -> ThreadPolicy:
    """The policy this process (or the sidecar that started this worker) applied; decided anew if none was."""
    applied = os.environ.get(ENV_APPLIED)
    if applied:
        try:
            return ThreadPolicy(**json.loads(applied))
        except (TypeError, ValueError):
            pass
    return decide()
