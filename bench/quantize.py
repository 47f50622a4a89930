"""Quantization benchmark: `quantize` over the protocol against llama-cpp-python's llama_model_quantize.

    python bench/quantize.py            # default: 5 runs per side, Q4_K_M (about 2 minutes on 2 cores, +30 s once)
    python bench/quantize.py --quick    # smoke run: 2 runs per side
    python bench/quantize.py --type Q8_0 --runs 3

Model: SmolLM2-135M's shape (Llama, hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings) with seeded random weights, the same one bench/generate.py builds
(shared cache, bench/results/generate-cache/), converted to an f16 GGUF with our convert_to_gguf.

Ours: a `python -m sidecar` started once; each run sends `quantize {model: <f16 .gguf>, format:
gguf, type}` with a fresh `output` directory and waits for the response. That is the whole method:
a worker process, llama.cpp's quantizer in a thread with progress, the vocabulary read for the
Modelfile and the output's sha256 (both made while llama.cpp works), the Modelfile and the model
card, fsyncing every file into the registry, the atomic rename. The baseline:
`llama_cpp.llama_model_quantize(src, dst, params)` with `llama_model_quantize_default_params()`
and the same ftype, called in this process (llama.cpp's log silenced), into the same directory.
Both use llama.cpp's default thread count. Runs alternate order, each after 2 s idle (the spare worker a job leaves behind has started, as it has by a user's next request); the table shows medians, and the
host-side overhead is split into the quantization step inside the worker (as the worker timed it)
and the rest. The quantized files must be identical (sha256).

It prints a table and a JSON document, also written to bench/results/quantize.json. Exit code 0
even when the target is missed: it is a measurement; look for FAIL.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "quantize.json"
sys.path.insert(0, str(ROOT))

from bench.generate import CACHE, build_assets  # noqa: E402
from bench.report import fmt, git_commit, print_aligned, verdict  # noqa: E402
from sidecar.client import SidecarProcess  # noqa: E402

TARGET_RATIO = 1.05


SETTLE_S = 2.0  # idle time before every run: the sidecar's spare worker finishes starting, the disk settles


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def direct(source: Path, out: Path, ftype: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return elapsed


def ours(sidecar: SidecarProcess, source: Path, out: Path, qtype: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = sidecar.request("quantize", {"model": str(source), "format": "gguf", "type": qtype, "output": str(out)})
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="measured runs per side (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--type", default="Q4_K_M", help="quantization type (default Q4_K_M)")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)

    import llama_cpp

    from runtimes.gguf.quantize import QUANT_TYPES, canonical_type

    qtype = canonical_type(args.type)
    CACHE.mkdir(parents=True, exist_ok=True)
    assets = build_assets(CACHE, ["f16"], rebuild=False)
    source = Path(assets["gguf_paths"]["f16"])
    silent = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(silent, ctypes.c_void_p(0))

    work = Path(tempfile.mkdtemp(prefix="quantize-", dir=CACHE))  # the same file system as the source, for both
    env = dict(os.environ, MLSIDECAR_HOME=str(work / "home"), MLSIDECAR_LOG_LEVEL="WARNING")
    times: dict[str, list[float]] = {"ours": [], "direct": []}
    inside: list[float] = []
    hashes: dict[str, set[str]] = {"ours": set(), "direct": set()}
    try:
        with SidecarProcess(["--allow-root", str(work)], env=env) as sidecar:
            sidecar.request("ping")
            # warm-up: the page cache holds the source for both, and each side has run once
            direct(source, work / "warm.gguf", QUANT_TYPES[qtype])
            ours(sidecar, source, work / "warm-ours", qtype)
            load_before = os.getloadavg()
            for run in range(runs):
                for side in ("ours", "direct") if run % 2 == 0 else ("direct", "ours"):
                    time.sleep(SETTLE_S)  # each run starts on an idle machine, as a user's next request does
                    out = work / f"{side}-{run}"
                    if side == "direct":
                        out.mkdir()
                        target = out / "model.gguf"
                        times["direct"].append(direct(source, target, QUANT_TYPES[qtype]))
                    else:
                        elapsed, result = ours(sidecar, source, out, qtype)
                        times["ours"].append(elapsed)
                        inside.append(result["artifact"]["metrics"]["quantize_seconds"])
                        target = Path(result["path"])
                    hashes[side].add(sha256(target))
                    shutil.rmtree(out)
                print(f"run {run + 1}/{runs}: ours {times['ours'][-1]:.2f}s (quantize step {inside[-1]:.2f}s), "
                      f"direct {times['direct'][-1]:.2f}s", file=sys.stderr)
            load_after = os.getloadavg()
            sidecar.request("shutdown")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = {side: statistics.median(ts) for side, ts in times.items()}
    ratio = median["ours"] / median["direct"]
    paired = statistics.median(o / d for o, d in zip(times["ours"], times["direct"]))  # robust to the VM's swings
    identical = len(hashes["ours"] | hashes["direct"]) == 1
    rows = [
        {"metric": f"{qtype} quantize, request -> response (median of {runs})", "ours": median["ours"],
         "baseline": median["direct"], "ratio": ratio, "target": f"<= {TARGET_RATIO}x", "unit": "s",
         "pass": ratio <= TARGET_RATIO},
        {"metric": "  the same, per run pair (median of ours / direct, the two runs next to each other)",
         "ours": paired, "baseline": 1.0, "ratio": paired, "target": "-", "unit": "x", "pass": None},
        {"metric": "  of which the quantization step in the worker", "ours": statistics.median(inside),
         "baseline": median["direct"], "ratio": statistics.median(inside) / median["direct"], "target": "-", "unit": "s",
         "pass": None},
        {"metric": "  of which the rest (worker start, files, hashing, fsync)",
         "ours": median["ours"] - statistics.median(inside), "baseline": 0.0, "ratio": None, "target": "-", "unit": "s",
         "pass": None},
        {"metric": "quantized files identical (sha256)", "ours": float(identical), "baseline": 1.0, "ratio": None,
         "target": "identical", "unit": "n", "pass": identical},
    ]
    report = {
        "benchmark": "quantize", "type": qtype, "runs": runs,
        "model": "SmolLM2-135M shape, random weights, f16 GGUF from our convert_to_gguf",
        "source": str(source), "source_bytes": source.stat().st_size,
        "results": {"ours_s": times["ours"], "ours_quantize_step_s": inside, "direct_s": times["direct"],
                    "median_ours_s": median["ours"], "median_direct_s": median["direct"],
                    "ratio": ratio, "ratio_paired_median": paired, "ratio_best_runs": min(times["ours"]) / min(times["direct"]),
                    "identical_output": identical, "sha256": sorted(hashes["ours"] | hashes["direct"])},
        "target_ratio": TARGET_RATIO, "pass": ratio <= TARGET_RATIO and identical,
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                        "llama_cpp_python": llama_cpp.__version__, "loadavg_before": load_before,
                        "loadavg_after": load_after, "git_commit": git_commit(ROOT)},
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print()
    cells = [(r["metric"], fmt(r["ours"], r["unit"]) if r["unit"] == "s" else "-" if r["unit"] == "x"
              else ("yes" if r["ours"] else "no"),
              fmt(r["baseline"], r["unit"]) if r["unit"] == "s" and r["baseline"] else "-",
              f"{r['ratio']:.3f}x" if r["ratio"] is not None else "-", r["target"], verdict(r)) for r in rows]
    print_aligned(("metric", "ours", "llama_model_quantize", "ratio", "target", "result"), cells, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
