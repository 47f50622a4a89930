"""merge_lora benchmark: our streamed merge against peft's merge_and_unload + save_pretrained.

    python bench/merge_lora.py            # default: 3 runs of each side (about 3 minutes on 2 cores, + the model once)
    python bench/merge_lora.py --quick    # smoke run: 1 run of each
    python bench/merge_lora.py --runs 5 --threads 4

The model: SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab
49152, tied embeddings) with seeded random weights in float32 safetensors, the directory bench/generate.py
builds (reused from its cache, bench/results/generate-cache/). The adapter: peft LoRA r 16, alpha 32 on all
linear layers (q/k/v/o/gate/up/down, 210 modules), A as peft initialises it and B seeded random (nonzero),
built once into bench/results/merge-cache/.

Every side runs in a fresh process of its own, one after the other, alternating order run by run; peak
RSS is that process's ru_maxrss, read with resource.getrusage(RUSAGE_CHILDREN) by a small launcher process
that started it (see _LAUNCHER for why; the sidecar's includes its worker, which it reaps):
- peft: `python bench/merge_lora.py --worker peft`: AutoModelForCausalLM.from_pretrained (float32),
  PeftModel.from_pretrained, merge_and_unload(), save_pretrained() (safetensors). Work time = load to saved.
- ours: `python bench/merge_lora.py --worker ours`: runtimes.hf.merge.merge_adapters (the function
  `merge_lora` runs, and the one `export` with merge: true calls). Work time = that call.
- merge_lora: `python -m sidecar` with one `merge_lora` request (`verify` false, then, as a separate
  side, the default `verify` true), timed from spawn to the answer; a private MLSIDECAR_HOME.
Whole-process time is spawn to exit (imports included) for peft and ours; the targets compare it and the
peak RSS: merge_lora (verify false) and ours no slower and no bigger than peft. The merged weights of ours
and peft are compared once (largest absolute difference, target <= 1e-6).

It prints a table and a JSON document (also written to bench/results/merge_lora.json), exit code 0 even
when a target is missed: it is a measurement; look for FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "merge_lora.json"
CACHE = ROOT / "bench" / "results" / "merge-cache"
sys.path.insert(0, str(ROOT))

ADAPTER_VERSION = "r16-all-linear-v1"  # bump whenever the adapter recipe changes
SEED = 4321
RANK, ALPHA = 16, 32
B_STD = 0.02


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- assets


def build_adapter(base_dir: Path, cache_dir: Path) -> Path:
    """peft's LoRA on all linear layers, B filled with seeded noise so the merge changes every module."""
    out = cache_dir / ADAPTER_VERSION / "adapter"
    if (out / "adapter_model.safetensors").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _log(f"building the adapter into {out} (once) ...")
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, B_STD)
    staging = Path(tempfile.mkdtemp(prefix="adapter-", dir=cache_dir))
    peft_model.save_pretrained(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
    return out


# ----------------------------------------------------------------------------- the sides


def worker(side: str, base: Path, adapter: Path, out: Path, threads: int) -> None:
    """One side's work in this (fresh) process; prints {"work_s": ...} as its last line."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    if side == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
    else:
        from runtimes.hf.merge import merge_adapters

        merge_adapters(base, [(adapter, 1.0)], out)
    print(json.dumps({"work_s": time.perf_counter() - started}), flush=True)


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIDECAR_")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


# A process started by fork or vfork inherits its parent's peak RSS into ru_maxrss (Linux carries the
# old address space's high-water mark over exec), so this benchmark's own memory would leak into every
# side's number. Each side is therefore started by this small launcher, whose own peak is a few MB: it
# runs the command as its child, waits, and appends that child's ru_maxrss (RUSAGE_CHILDREN: the child
# and the processes it reaped, e.g. the sidecar's worker) as the last line of the shared stdout.
_LAUNCHER = ("import json, resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
             "print(json.dumps({'exit': code, 'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}), "
             "flush=True)")


def _launch(command: list[str], threads: int, stderr: Any, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _LAUNCHER, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, env={**_env(threads), **extra_env}, cwd=str(ROOT))


def _finish(proc: subprocess.Popen, stderr: Any, side: str) -> tuple[list[dict[str, Any]], int]:
    """Every JSON line left on stdout (the launcher's last), once the process has exited."""
    assert proc.stdout is not None
    lines = [json.loads(line) for line in proc.stdout.read().decode().splitlines() if line.startswith("{")]
    proc.wait()
    if not lines or lines[-1].get("exit") != 0:
        stderr.seek(0)
        raise RuntimeError(f"{side} failed ({lines[-1:]}):\n{stderr.read().decode(errors='replace')[-3000:]}")
    return lines, lines[-1]["peak_rss_bytes"]


def run_process(side: str, base: Path, adapter: Path, out: Path, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = _launch([sys.executable, str(Path(__file__).resolve()), "--worker", side, "--base", str(base), "--adapter",
                        str(adapter), "--out", str(out), "--threads", str(threads)], threads, stderr)
        lines, peak = _finish(proc, stderr, side)
        wall = time.perf_counter() - started
    return {"process_s": wall, "work_s": lines[-2]["work_s"], "peak_rss_bytes": peak}


def run_sidecar(base: Path, adapter: Path, out: Path, threads: int, verify: bool) -> dict[str, Any]:
    """`python -m sidecar`, one merge_lora request over its pipes, then end of input (it exits)."""
    home = Path(tempfile.mkdtemp(prefix="merge-home-"))
    request = {"jsonrpc": "2.0", "id": 1, "method": "merge_lora",
               "params": {"model": str(base), "adapters": [{"adapter": str(adapter)}], "output": str(out), "verify": verify}}
    try:
        with tempfile.TemporaryFile() as stderr:
            started = time.perf_counter()
            proc = _launch([sys.executable, "-m", "sidecar", "--allow-root", str(base.parent), "--allow-root",
                            str(adapter.parent), "--allow-root", str(out.parent)], threads, stderr, MLSIDECAR_HOME=str(home))
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            while True:
                line = proc.stdout.readline()
                message = json.loads(line) if line else {"error": "the sidecar closed its output"}
                if message.get("id") == 1 or not line:
                    break
            answered = time.perf_counter() - started
            proc.stdin.close()
            _, peak = _finish(proc, stderr, "merge_lora")
        if "result" not in message:
            raise RuntimeError(f"merge_lora failed: {message}")
        verification = message["result"]["verification"] or {}
        return {"process_s": answered, "work_s": message["result"]["seconds"], "peak_rss_bytes": peak,
                "max_abs_logit_diff": verification.get("max_abs_logit_diff")}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def compare_weights(ours: Path, theirs: Path) -> float:
    """Largest absolute difference between the two merged checkpoints, tensor by tensor."""
    from safetensors import safe_open

    def files(d: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(d.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: path for key in handle.keys()})
        return found

    a, b = files(ours), files(theirs)
    if set(a) != set(b):
        raise RuntimeError(f"the merged checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for key in a:
        with safe_open(str(a[key]), framework="pt") as x, safe_open(str(b[key]), framework="pt") as y:
            worst = max(worst, float((x.get_tensor(key).float() - y.get_tensor(key).float()).abs().max()))
    return worst


# ----------------------------------------------------------------------------- report


def _median(samples: list[dict[str, Any]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def build_rows(sides: dict[str, list[dict[str, Any]]], weight_diff: float) -> list[dict[str, Any]]:
    from bench.report import fmt

    peft = sides["peft"]
    rows = []

    def row(metric: str, ours: float, base: float | None, unit: str, target: str | None) -> None:
        ratio = ours / base if base else None
        ok = None if target is None or ratio is None else ratio <= 1.0
        rows.append({"metric": metric, "ours": ours, "baseline": base, "unit": unit, "ratio": ratio, "target": target, "pass": ok})

    for name, label in (("merge_lora", "merge_lora, verify false"), ("ours", "merge_adapters"),
                        ("merge_lora_verify", "merge_lora, verify true")):
        if name not in sides:
            continue
        target = None if name == "merge_lora_verify" else "<= 1.0x peft"
        row(f"{label}: whole process", _median(sides[name], "process_s"), _median(peft, "process_s"), "s", target)
        row(f"{label}: work", _median(sides[name], "work_s"), _median(peft, "work_s"), "s", None)
        row(f"{label}: peak RSS (MB)", _median(sides[name], "peak_rss_bytes") / 1e6, _median(peft, "peak_rss_bytes") / 1e6,
            "MB", target)
    rows.append({"metric": "weights: max |ours - peft|", "ours": weight_diff, "baseline": None, "unit": "abs", "ratio": None,
                 "target": "<= 1e-6", "pass": weight_diff <= 1e-6})
    for r in rows:
        r["ours_text"] = fmt(r["ours"], r["unit"]) if r["unit"] == "s" else f"{r['ours']:.4g}"
        r["baseline_text"] = "-" if r["baseline"] is None else (fmt(r["baseline"], r["unit"]) if r["unit"] == "s" else f"{r['baseline']:.4g}")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    from bench.report import print_aligned, verdict

    cells = [(r["metric"], r["ours_text"], r["baseline_text"], "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
              r["target"] or "-", verdict(r)) for r in rows]
    print_aligned(("metric", "ours", "peft", "ratio", "target", "verdict"), cells, rows)


def environment() -> dict[str, Any]:
    from bench import report

    return report.environment(ROOT, ("torch", "transformers", "peft", "safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run of each side")
    parser.add_argument("--runs", type=int, help="runs per side (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads for every side (default 2)")
    parser.add_argument("--no-verify-side", action="store_true", help="skip the merge_lora verify: true side")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--worker", choices=("peft", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.base, args.adapter, args.out, args.threads)
        return 0

    from bench.generate import CACHE as MODEL_CACHE
    from bench.generate import MODEL_DIMS, build_assets

    runs = args.runs or (1 if args.quick else 3)
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    base = Path(build_assets(MODEL_CACHE.resolve(), [], False)["hf_dir"])
    adapter = build_adapter(base, CACHE.resolve())
    results: dict[str, Any] = {"benchmark": "merge_lora", "environment": environment(),
                               "config": {"runs": runs, "threads": args.threads, "model_dims": MODEL_DIMS, "rank": RANK,
                                          "alpha": ALPHA, "target_modules": "all-linear", "base": str(base), "adapter": str(adapter)},
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    order = ["peft", "ours", "merge_lora"] + ([] if args.no_verify_side else ["merge_lora_verify"])
    sides: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    work = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-merge-"))
    weight_diff = None
    try:
        for run in range(runs):
            for name in (order if run % 2 == 0 else order[::-1]):
                out = work / f"{name}-{run}"
                _log(f"[run {run + 1}/{runs}] {name} ...")
                if name in ("peft", "ours"):
                    sample = run_process(name, base, adapter, out, args.threads)
                else:
                    sample = run_sidecar(base, adapter, out, args.threads, verify=name == "merge_lora_verify")
                sides[name].append(sample)
                _log(f"    {sample}")
            if weight_diff is None:
                weight_diff = compare_weights(work / "ours-0", work / "peft-0")
            for path in work.iterdir():
                shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["samples"] = sides
    rows = build_rows(sides, weight_diff if weight_diff is not None else float("nan"))
    results["rows"] = [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
