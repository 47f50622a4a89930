"""Core ML export benchmark: conversion time, package size and the accuracy proxy per compression.

    python bench/export_coreml.py                 # default: 8 layers of SmolLM2-135M's shape (see below)
    python bench/export_coreml.py --layers 30     # the full depth (about 4x longer: ~30 min on 2 busy cores)
    python bench/export_coreml.py --quick         # 2 layers: a smoke run

Model: SmolLM2-135M's dimensions (Llama, hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab
49152, tied embeddings) with seeded random weights, the one bench/generate.py builds (shared cache,
bench/results/generate-cache/), cut to its first --layers layers (default 8: converting and
k-means-clustering all 30 on two shared cores takes tens of minutes; the per-layer tensors are
the same, so sizes scale linearly and the ratios barely move; --layers 30 measures the real depth).

Pipeline, the one the export handler runs (runtimes/coreml): the prefill (64-token chunk) and
decode functions traced and converted once in float16, context 512; then per scheme each function
compressed (coremltools.optimize.coreml), assembled into one multifunction package, and the
decompressed weights run in the torch export module against the float16 weights on the CC0 corpus
text (runtimes/coreml/report.py). Export time = conversion + compression + assembly (one run: these
are minutes, not milliseconds; the conversion is shared, so it is the same figure in every row).
Size is the whole .mlpackage; the ratio is against the float16 package. Target: the 4-bit
(group 16) package at most 0.3x the float16 one.

Prints a table and a JSON document, also written to bench/results/export_coreml.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "export_coreml.json"
sys.path.insert(0, str(ROOT))

from bench.generate import CACHE, build_assets  # noqa: E402
from bench.report import fmt, git_commit, print_aligned, verdict  # noqa: E402

TARGET_4BIT = 0.3
SCHEMES: dict[str, dict[str, Any] | None] = {
    "float16": None,
    "palettize 8-bit": {"mode": "palettize", "nbits": 8},
    "palettize 6-bit": {"mode": "palettize", "nbits": 6},
    "palettize 4-bit g16": {"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16},
    "int4 per-block 32": {"mode": "linear", "dtype": "int4", "granularity": "per_block", "block_size": 32},
    "mixed 6/4-bit": {"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16,
                      "overrides": [{"op_name": "model.layers.*.self_attn.*", "nbits": 6, "granularity": "per_tensor"}]},
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cut_model(hf_dir: Path, layers: int, out: Path) -> Path:
    """The first `layers` layers of the model (config and safetensors), built once."""
    from safetensors.torch import load_file, save_file

    target = out / f"layers-{layers}"
    if (target / "model.safetensors").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix="cut-", dir=out))
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(str(hf_dir / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(kept, str(staging / "model.safetensors"), metadata={"format": "pt"})
    for item in hf_dir.iterdir():
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            shutil.copy2(item, staging / item.name)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 layers")
    args = parser.parse_args()
    layers = 2 if args.quick else args.layers

    import coremltools as ct
    import torch

    from runtimes.coreml import compress, convert, report, spec
    from runtimes.coreml.decoder import load_decoder, read_spec

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    convert._quiet()
    info = build_assets(CACHE, [], rebuild=False)
    cache = ROOT / "bench" / "results" / "coreml-cache"
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = cut_model(Path(info["hf_dir"]), layers, cache)
    work = Path(tempfile.mkdtemp(prefix="coreml-bench-", dir=cache))
    rows: list[dict[str, Any]] = []
    try:
        model_spec = read_spec(model_dir)
        request = convert.Request(model_dir, work / "unused.mlpackage", work, args.context, args.prefill,
                                  ("prefill", "decode"))
        decoder = load_decoder(model_dir, args.context, cache_dtype=torch.float16, spec=model_spec)
        shapes = {n: tuple(t.shape) for n, t in decoder.state_dict().items() if n != "lm_head.weight"}
        base_packages: dict[str, Path] = {}
        convert_s = 0.0
        for function in request.functions:
            _log(f"converting {function} ({layers} layers, context {args.context}) ...")
            started = time.perf_counter()
            mlmodel = convert.convert_function(decoder, function, request)
            path = work / f"{function}.f16.mlpackage"
            mlmodel.save(str(path))
            convert_s += time.perf_counter() - started
            base_packages[function] = path
        f16_bytes = None
        for label, quantization in SCHEMES.items():
            _log(f"{label} ...")
            memo = compress.KMeansMemo()
            plan = compress.parse(quantization) if quantization else None
            packages: dict[str, Path] = {}
            compress_s = 0.0
            left: list[dict[str, Any]] = []
            for function, path in base_packages.items():
                if plan is None:
                    packages[function] = path
                    continue
                started = time.perf_counter()
                mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
                parameters = spec.parameter_names(spec.program_consts(mlmodel), shapes)
                compressed = compress.compress_model(mlmodel, plan, parameters, memo)
                out = work / f"{function}.{len(rows)}.mlpackage"
                compressed.save(str(out))
                compress_s += time.perf_counter() - started
                packages[function] = out
                if not left:
                    left = [u for u in compress.uncompressed(compressed, plan, parameters, shapes) if len(u["shape"]) > 1]
            started = time.perf_counter()
            final = work / f"model.{len(rows)}.mlpackage"
            convert.assemble(packages, final)
            assemble_s = time.perf_counter() - started
            size = package_bytes(final)
            f16_bytes = f16_bytes or size
            accuracy = report.accuracy(model_dir, packages["decode"], args.context, model_spec) if plan else None
            description = spec.describe(final)
            row = {"scheme": label, "quantization": quantization, "export_s": round(convert_s + compress_s + assemble_s, 2),
                   "convert_s": round(convert_s, 2), "compress_s": round(compress_s, 2), "assemble_s": round(assemble_s, 2),
                   "size_bytes": size, "weight_bytes": description["weight_bytes"], "ratio": round(size / f16_bytes, 4),
                   "logit_max_abs_diff": accuracy["logit_max_abs_diff"] if accuracy else 0.0,
                   "logit_mean_abs_diff": accuracy["logit_mean_abs_diff"] if accuracy else 0.0,
                   "perplexity": accuracy["perplexity"] if accuracy else None,
                   "perplexity_base": accuracy["perplexity_base"] if accuracy else None,
                   "uncompressed_matrices": [u["name"] for u in left],
                   "metric": f"{label}: package <= {TARGET_4BIT}x float16" if label == "palettize 4-bit g16" else label,
                   "pass": (size / f16_bytes <= TARGET_4BIT) if label == "palettize 4-bit g16" else None}
            rows.append(row)
            _log(json.dumps({k: row[k] for k in ("scheme", "export_s", "size_bytes", "ratio", "logit_max_abs_diff")}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ("scheme", "export", "convert", "compress", "package", "ratio", "max |dlogit|", "mean |dlogit|", "ppl", "ppl f16",
              "verdict")
    cells = [(r["scheme"], fmt(r["export_s"], "s"), fmt(r["convert_s"], "s"), fmt(r["compress_s"], "s"),
              f"{r['size_bytes'] / 2**20:.1f} MiB", f"{r['ratio']:.3f}", f"{r['logit_max_abs_diff']:.4f}",
              f"{r['logit_mean_abs_diff']:.4f}", "-" if r["perplexity"] is None else f"{r['perplexity']:.1f}",
              "-" if r["perplexity_base"] is None else f"{r['perplexity_base']:.1f}", verdict(r)) for r in rows]
    print(f"Core ML export, SmolLM2-135M shape with {layers} of 30 layers (random weights), context {args.context}, "
          f"prefill {args.prefill}, functions prefill+decode")
    print_aligned(header, cells, rows)
    document = {"benchmark": "export_coreml", "commit": git_commit(ROOT), "platform": platform.platform(),
                "cpus": os.cpu_count(), "versions": {"coremltools": ct.__version__, "torch": torch.__version__},
                "model": {"shape": "SmolLM2-135M", "layers": layers, "of_layers": 30, "parameters":
                          sum(t.numel() for t in decoder.state_dict().values()) - (576 * 49152 if model_spec.tied else 0)},
                "context_length": args.context, "prefill_length": args.prefill, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
