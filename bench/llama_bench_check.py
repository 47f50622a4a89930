"""Is `benchmark` as trustworthy as llama-bench? Our method against llama.cpp's own tools, on one GGUF.

    python bench/llama_bench_check.py            # about 6-10 minutes on 2 loaded cores once built
    python bench/llama_bench_check.py --quick    # 1 round, shorter lengths: about 3 minutes
    python bench/llama_bench_check.py --rounds 5 --threads 2 --pp 256 --tg 64

The tools: llama-bench and llama-perplexity, built from the llama.cpp sources vendored in the
llama-cpp-python source distribution the sidecar runs on (the same version, so the same kernels):
`pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==<installed>` and a CMake
Release build (GGML_NATIVE, OpenMP: llama.cpp's defaults) of those two targets only, into
bench/results/llama-cpp-tools/ (git-ignored, built once: several minutes on 2 cores). cmake and ninja
come from PATH, else from their PyPI wheels, unpacked there (not installed).

The model: SmolLM2-135M's shape with random weights (bench/generate.py's build: LlamaConfig hidden 576,
30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied), converted to an f32 GGUF with
runtimes/gguf/export.py convert_to_gguf. The text: runtimes/data/tiny_corpus.txt.

What it compares (both sides with the same threads, lengths, n_batch 2048, n_ubatch 512 and
OMP_WAIT_POLICY=PASSIVE; the rounds alternate llama-bench and our sidecar so a change in the machine's
load hits both; each side's number is its mean tokens/s over the repetitions, as llama-bench's avg_ts):
1. pp N and tg N tokens/s: `llama-bench -p N -n N -r R -t T -o json` against `benchmark` through
   `python -m sidecar` (the GGUF on llama.cpp). Target: the median over rounds of the per-round
   ratio (the two sides run back to back) within 10% of 1; the table also shows each side's median
   mean tokens/s and the ratio of their best repetitions.
2. chunks perplexity (context 512): `llama-perplexity -c 512 -b 512` ("Final estimate") against
   `benchmark`'s `perplexity.method: "chunks"` on the same GGUF. Target: within 1%.
3. sliding perplexity (context 512, stride 256) of the f32 GGUF on llama.cpp through `benchmark`,
   against the Hugging Face model computed here with transformers' own labels loss (the loop of
   Hugging Face's perplexity guide, each window's loss weighted by the labels it averaged).
   Target: within 0.5%. Also shown: `benchmark` on the transformers runtime.

It prints a table and the JSON (also bench/results/llama_bench_check.json), with the CPU time other
processes used meanwhile next to the speed numbers: on a shared machine the absolute numbers move;
the ratio within a round is what is checked. Exit code 0 even when a target is missed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import git_commit, print_aligned, verdict  # noqa: E402
from runtimes.bench import machine  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TOOLS = RESULTS / "llama-cpp-tools"
CORPUS = ROOT / "runtimes" / "data" / "tiny_corpus.txt"
SPEED_TARGET, CHUNKS_TARGET, SLIDING_TARGET = 0.10, 0.01, 0.005


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- building the tools


def _tool(name: str, wheel: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    unpacked = TOOLS / "tools" / wheel
    candidates = list(unpacked.rglob(name)) if unpacked.exists() else []
    if not candidates:
        _log(f"{name} not on PATH: fetching its wheel from PyPI (unpacked under {unpacked}, not installed)")
        download = TOOLS / "tools" / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", wheel, "-d", str(download)],
                       check=True)
        for path in download.glob(f"{wheel}-*.whl"):
            zipfile.ZipFile(path).extractall(unpacked)
        candidates = list(unpacked.rglob(name))
    binary = next(p for p in candidates if p.is_file())
    binary.chmod(0o755)
    return str(binary)


def build_tools() -> dict[str, Path]:
    bin_dir = TOOLS / "build" / "bin"
    tools = {"bench": bin_dir / "llama-bench", "perplexity": bin_dir / "llama-perplexity"}
    if all(p.exists() for p in tools.values()):
        return tools
    version = importlib.metadata.version("llama-cpp-python")
    TOOLS.mkdir(parents=True, exist_ok=True)
    source = TOOLS / f"llama_cpp_python-{version}"
    if not source.exists():
        _log(f"downloading the llama-cpp-python {version} source distribution ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={version}", "-d", str(TOOLS)], check=True)
        subprocess.run(["tar", "xzf", str(TOOLS / f"llama_cpp_python-{version}.tar.gz"), "-C", str(TOOLS)], check=True)
    cmake, ninja = _tool("cmake", "cmake"), _tool("ninja", "ninja")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(ninja).parent), os.environ.get("PATH", "")]))
    build = TOOLS / "build"
    _log("configuring and building llama-bench and llama-perplexity (several minutes on 2 cores) ...")
    subprocess.run([cmake, "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], check=True, env=env)
    subprocess.run([cmake, "--build", str(build), "-j", str(machine.cpu_count()), "--target", "llama-bench", "llama-perplexity"],
                   check=True, env=env)
    return tools


# ----------------------------------------------------------------------------- running the sides


class ChildMeter:
    """Other processes' CPU use while a child tool ran: machine busy time minus the children's and ours."""

    def __enter__(self) -> "ChildMeter":
        self.before, self.children = machine.snapshot(), resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc: Any) -> None:
        after, children = machine.snapshot(), resource.getrusage(resource.RUSAGE_CHILDREN)
        hz = os.sysconf("SC_CLK_TCK")
        used = (children.ru_utime + children.ru_stime - self.children.ru_utime - self.children.ru_stime) * hz
        seconds = after.at - self.before.at
        if None in (after.busy_ticks, self.before.busy_ticks):
            self.foreign = None
            return
        other = (after.busy_ticks - self.before.busy_ticks) - (after.own_ticks - self.before.own_ticks) - used  # type: ignore[operator]
        self.foreign = round(max(0.0, other / hz / seconds), 3)


def tool_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))


def llama_bench(tools: dict[str, Path], gguf: Path, pp: int, tg: int, reps: int, threads: int) -> dict[str, Any]:
    with ChildMeter() as meter:
        out = subprocess.run([str(tools["bench"]), "-m", str(gguf), "-p", str(pp), "-n", str(tg), "-r", str(reps), "-t", str(threads),
                              "-b", "2048", "-ub", "512", "-o", "json"], capture_output=True, text=True, check=True, env=tool_env(threads))
    tests = json.loads(out.stdout)
    found = {}
    for t in tests:
        name = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
        found[name] = {"mean_tps": t["avg_ts"], "std_tps": t["stddev_ts"], "samples_tps": t["samples_ts"]}
    return {"tests": found, "foreign_cpus": meter.foreign, "build": tests[0].get("build_commit"), "n_threads": tests[0]["n_threads"]}


def llama_perplexity(tools: dict[str, Path], gguf: Path, text: Path, threads: int) -> dict[str, Any]:
    out = subprocess.run([str(tools["perplexity"]), "-m", str(gguf), "-f", str(text), "-c", "512", "-b", "512", "-t", str(threads)],
                         capture_output=True, text=True, check=True, env=tool_env(threads))
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out.stdout + out.stderr)
    if final is None:
        raise RuntimeError("llama-perplexity printed no final estimate:\n" + (out.stdout + out.stderr)[-2000:])
    return {"ppl": float(final.group(1)), "error": float(final.group(2)), "chunks": int(chunks.group(1)) if chunks else None}


def hf_sliding(hf_dir: Path, text: str, context: int, stride: int, threads: int) -> dict[str, Any]:
    """Hugging Face's perplexity guide, on transformers directly (the count: the labels the loss averaged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(hf_dir).encode(text, add_special_tokens=True, verbose=False)])
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + context, ids.size(1))
        trg = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll_sum, count, prev_end = nll_sum + float(loss) * n, count + n, end
        if end == ids.size(1):
            break
    import math

    return {"ppl": math.exp(nll_sum / count), "tokens": int(ids.size(1)), "scored": count}


class Ours:
    """The real sidecar over its pipes, with the model's folder inside its roots."""

    def __init__(self, roots: list[Path], home: Path) -> None:
        from sidecar.client import SidecarProcess

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIDECAR_")}
        env.update(MLSIDECAR_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        args = [arg for root in roots for arg in ("--allow-root", str(root))]
        self.proc = SidecarProcess(args, env=env, stderr=subprocess.DEVNULL)

    def benchmark(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.proc.request("benchmark", params)

    def close(self) -> None:
        self.proc.close()


# ----------------------------------------------------------------------------- the report


def _ratio_row(metric: str, ours: float, base: float, target: float, unit: str, note: str = "") -> dict[str, Any]:
    diff = abs(ours - base) / base if base else float("inf")
    return {"metric": metric, "ours": ours, "baseline": base, "ratio": ours / base if base else None, "diff": diff,
            "target": target, "pass": diff <= target, "unit": unit, "note": note}


def speed_row(rounds: list[dict[str, Any]], test: str) -> dict[str, Any]:
    """The verdict is the median over rounds of the per-round ratio (ours / llama-bench, run back to back),
    which cancels the machine's slow swings in load; the medians of each side's means and the best
    repetition of each side are shown beside it."""
    ours = [r["ours"]["tests"][test]["mean_tps"] for r in rounds]
    theirs = [r["llama_bench"]["tests"][test]["mean_tps"] for r in rounds]
    paired = statistics.median(a / b for a, b in zip(ours, theirs))
    best = max(x for r in rounds for x in r["ours"]["tests"][test]["samples_tps"]) / \
        max(x for r in rounds for x in r["llama_bench"]["tests"][test]["samples_tps"])
    loads = [x for r in rounds for x in (r["ours"]["foreign_cpus"], r["llama_bench"]["foreign_cpus"]) if x is not None]
    note = (f"medians {statistics.median(ours):.1f} / {statistics.median(theirs):.1f} t/s; best repetition ratio {best:.3f}"
            + (f"; shared machine: other processes used {min(loads):.2f}-{max(loads):.2f} CPUs" if loads else ""))
    row = _ratio_row(f"{test} t/s ours/llama-bench, median of {len(rounds)} paired rounds", statistics.median(ours),
                     statistics.median(theirs), SPEED_TARGET, "tps", note)
    row.update(ratio=paired, diff=abs(paired - 1), paired_ratios=[a / b for a, b in zip(ours, theirs)], best_ratio=best)
    row["pass"] = row["diff"] <= SPEED_TARGET
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["metric", "ours", "baseline", "ratio", "|diff|", "target", "", "note"]
    cells = [[r["metric"], f"{r['ours']:.4f}" if r["unit"] == "ppl" else f"{r['ours']:.2f} t/s",
              f"{r['baseline']:.4f}" if r["unit"] == "ppl" else f"{r['baseline']:.2f} t/s",
              f"{r['ratio']:.4f}", f"{r['diff'] * 100:.2f}%", f"<= {r['target'] * 100:g}%", verdict(r), r["note"]] for r in rows]
    print_aligned(header, cells, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=machine.cpu_count())
    parser.add_argument("--pp", type=int, default=256)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--text-chars", type=int, default=12000,
                        help="perplexity on the corpus's first N characters (12000: about 3000 tokens, 5 chunks of 512)")
    parser.add_argument("--quick", action="store_true", help="1 round of pp 128 / tg 32 with 3 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.pp, args.tg, args.reps = 1, 128, 32, 3

    tools = build_tools()
    from bench.generate import CACHE, build_assets

    assets = build_assets(CACHE, ["f32"], rebuild=False)
    gguf, hf_dir = Path(assets["gguf_paths"]["f32"]), Path(assets["hf_dir"])
    results: dict[str, Any] = {"settings": {"threads": args.threads, "pp": args.pp, "tg": args.tg, "repetitions": args.reps,
                                            "rounds": args.rounds, "omp_wait_policy": "PASSIVE", "batch_size": 2048,
                                            "ubatch_size": 512, "model": str(gguf)}, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="bench-check-") as home:
        text = Path(home) / "text.txt"
        text.write_text(CORPUS.read_text(encoding="utf-8")[:args.text_chars], encoding="utf-8")
        results["settings"]["text"] = {"source": str(CORPUS.relative_to(ROOT)), "chars": args.text_chars}
        ours = Ours([Path(home), gguf.parent], Path(home) / "home")
        try:
            speed_params = {"models": [{"model": str(gguf), "label": "f32 gguf"}], "threads": args.threads,
                            "omp_wait_policy": "passive", "prompt_tokens": [args.pp], "gen_tokens": [args.tg],
                            "repetitions": args.reps, "warmup": 1}
            for index in range(args.rounds):
                order = ["llama-bench", "ours"] if index % 2 == 0 else ["ours", "llama-bench"]
                entry: dict[str, Any] = {}
                for side in order:
                    _log(f"round {index + 1}/{args.rounds}: {side}")
                    if side == "llama-bench":
                        entry["llama_bench"] = llama_bench(tools, gguf, args.pp, args.tg, args.reps, args.threads)
                    else:
                        row = ours.benchmark(speed_params)["rows"][0]
                        if row["status"] != "ok":
                            raise RuntimeError(f"our benchmark failed: {row['error']}")
                        entry["ours"] = {"tests": {s["test"]: s for s in row["speed"]},
                                         "foreign_cpus": row["machine"]["foreign_cpus"], "latency": row["latency"]}
                results["rounds"].append(entry)
            _log("perplexity: llama-perplexity (chunks, context 512)")
            results["llama_perplexity"] = llama_perplexity(tools, gguf, text, args.threads)
            ppl_only = {"threads": args.threads, "omp_wait_policy": "passive", "prompt_tokens": [], "gen_tokens": []}
            _log("perplexity: ours (chunks on the GGUF; sliding on the GGUF and on the transformers model)")
            chunks = ours.benchmark({**ppl_only, "models": [{"model": str(gguf)}],
                                     "perplexity": {"data": str(text), "method": "chunks", "context": 512}})
            sliding = ours.benchmark({**ppl_only, "models": [{"model": str(gguf), "label": "gguf"}, {"model": str(hf_dir), "label": "hf"}],
                                      "perplexity": {"data": str(text), "method": "sliding", "context": 512, "stride": 256}})
            _log("perplexity: Hugging Face's sliding window on transformers directly")
            results["hf_sliding"] = hf_sliding(hf_dir, text.read_text(encoding="utf-8"), 512, 256, args.threads)
        finally:
            ours.close()
    results["ours_chunks"] = chunks["rows"][0]["perplexity"]
    results["ours_sliding"] = {r["label"]: r["perplexity"] for r in sliding["rows"]}

    rows = []
    for test in (f"pp{args.pp}", f"tg{args.tg}"):
        rows.append(speed_row(results["rounds"], test))
    lp = results["llama_perplexity"]
    rows.append(_ratio_row("chunks PPL (ctx 512) vs llama-perplexity", results["ours_chunks"]["ppl"], lp["ppl"], CHUNKS_TARGET, "ppl",
                           f"{results['ours_chunks']['scored']} tokens scored; llama-perplexity {lp['chunks']} chunks"))
    hf = results["hf_sliding"]
    rows.append(_ratio_row("sliding PPL (512/256), f32 GGUF vs HF model", results["ours_sliding"]["gguf"]["ppl"], hf["ppl"],
                           SLIDING_TARGET, "ppl", f"{hf['scored']} tokens scored"))
    rows.append(_ratio_row("sliding PPL (512/256), ours on transformers vs HF", results["ours_sliding"]["hf"]["ppl"], hf["ppl"],
                           SLIDING_TARGET, "ppl", "same model, our window code"))
    results["rows"] = rows
    results["environment"] = {"commit": git_commit(ROOT), "cpus": machine.cpu_count(), "load_avg_1m": machine.load_avg_1m(),
                              "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
                              "llama_bench_build": results["rounds"][0]["llama_bench"]["build"], "time": time.time()}
    print(json.dumps(results, indent=2))
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama_bench_check.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
