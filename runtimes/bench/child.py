"""One model's measurements in a process of its own: `python -m runtimes.bench.child`.

Why a process per model: peak RSS and load time are then the model's own (nothing loaded before it,
nothing freed late), a crash takes one row, and the thread settings are set up fresh, the same way,
for every model. The spec comes as one JSON line on stdin; progress lines and then one result or
error line go out on a private copy of stdout (fd 1 itself is pointed at stderr, so a C library's
prints cannot corrupt them). It dies with its parent (PR_SET_PDEATHSIG on Linux; and a closed stdin).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Reporter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def progress(self, stage: str, step: int, total: int, message: str) -> None:
        self.send({"progress": {"stage": stage, "step": step, "total": total, "message": message}})


def open_engine(spec: dict[str, Any]) -> Any:
    from runtimes.bench.engines import LlamaCppEngine, OnnxEngine, TransformersEngine

    s = spec["settings"]
    path = Path(spec["path"])
    if spec["runtime"] == "onnxruntime":
        return OnnxEngine(path, threads=s["threads"], batch_size=s["batch_size"], device=spec.get("device", "auto"))
    if spec["runtime"] == "llama.cpp":
        return LlamaCppEngine(path, threads=s["threads"], batch_size=s["batch_size"], ubatch_size=s["ubatch_size"],
                              device=spec.get("device", "auto"))
    adapters = [(Path(p), float(w)) for p, w in spec.get("adapters", [])]
    return TransformersEngine(path, threads=s["threads"], batch_size=s["batch_size"], device=spec.get("device", "auto"),
                              dtype=spec.get("dtype", "auto"), adapters=adapters)


def _import_runtime(runtime: str) -> None:
    if runtime == "llama.cpp":
        import llama_cpp  # noqa: F401
    elif runtime == "onnxruntime":
        import onnxruntime  # noqa: F401
        import transformers  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401


def run(spec: dict[str, Any], out: Reporter) -> dict[str, Any]:
    """The row's measured fields; the parent adds what it knows (label, settings, key, change)."""
    from runtimes.bench import machine

    label = spec["label"]
    before = machine.snapshot()
    out.progress("load", 0, 1, f"{label}: loading")
    _import_runtime(spec["runtime"])  # load_s is the model's, not the seconds it takes to import torch
    started = time.perf_counter()
    engine = open_engine(spec)
    load_s = time.perf_counter() - started
    out.progress("load", 1, 1, f"{label}: loaded in {load_s:.2f} s")
    result: dict[str, Any] = {"load_s": round(load_s, 4), "device": engine.device, "dtype": engine.dtype,
                              "speed": [], "latency": None, "perplexity": None, "parity": None, "embed": None,
                              "golden": None}
    s = spec["settings"]
    causal = getattr(engine, "is_causal_lm", True)
    if spec.get("speed", True) and causal:
        from runtimes.bench import speed

        def tick(test: str, done: int, total: int) -> None:
            out.progress(test, done, total, f"{label}: {test} repetition {done}/{total}")

        measured = speed.measure(engine, s["prompt_tokens"], s["gen_tokens"], s["repetitions"], s["warmup"], s["seed"], tick)
        result.update(measured)
    if spec.get("perplexity") and causal:
        from runtimes.bench import perplexity

        p = spec["perplexity"]
        text = Path(p["path"]).read_text(encoding="utf-8")
        result["perplexity"] = perplexity.measure(
            engine, text, p["method"], p["context"], p["stride"], p.get("max_tokens"),
            lambda done, total: out.progress("perplexity", done, total, f"{label}: perplexity window {done}/{total}"))
    golden = spec.get("golden")
    if golden and causal:
        from runtimes.bench import parity

        if golden.get("transcripts") is None:
            result["golden"] = parity.transcripts(
                engine, golden["prompts"], golden["tokens"],
                lambda done, total: out.progress("golden", done, total, f"{label}: golden transcript {done}/{total}"))
            transcripts = result["golden"]
        else:
            transcripts = golden["transcripts"]
        result["parity"] = parity.compare(
            engine, golden["prompts"], transcripts, golden["reference"],
            lambda done, total: out.progress("parity", done, total, f"{label}: parity on prompt {done}/{total}"))
    embed = spec.get("embed")
    if embed:
        result["embed"] = _embed(engine, embed, label, out)
    after = machine.snapshot()
    result["machine"] = machine.describe(before, after)
    result["gpu_memory_bytes"] = engine.gpu_memory_bytes()
    engine.close()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return result


def _embed(engine: Any, embed: dict[str, Any], label: str, out: Reporter) -> dict[str, Any]:
    import numpy as np

    texts = embed["texts"]
    out.progress("embed", 0, 1, f"{label}: embedding {len(texts)} texts")
    started = time.perf_counter()
    vectors = np.asarray(engine.embed(texts, embed["batch_size"]), dtype=np.float32)
    seconds = time.perf_counter() - started
    if embed.get("save"):
        np.save(embed["save"], vectors)
    cosines = None
    if embed.get("reference_vectors") or embed.get("save"):  # the reference is compared with itself: 1.0
        ref = np.load(embed.get("reference_vectors") or embed["save"])
        if ref.shape == vectors.shape:
            a = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            b = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
            cosines = (a * b).sum(axis=1)
    out.progress("embed", 1, 1, f"{label}: embedded {len(texts)} texts in {seconds:.2f} s")
    return {"texts": len(texts), "dimensions": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "per_s": round(len(texts) / seconds, 3) if seconds > 0 else 0.0, "reference": embed.get("reference") or label,
            "cosine_mean": round(float(cosines.mean()), 6) if cosines is not None else None,
            "cosine_min": round(float(cosines.min()), 6) if cosines is not None else None}


def _error(exc: BaseException) -> dict[str, Any]:
    kind = getattr(exc, "error_kind", None) or ("out_of_memory" if isinstance(exc, MemoryError) else "internal")
    message = str(exc) if kind != "internal" else f"{type(exc).__name__}: {exc}"
    return {"kind": kind, "message": message, "detail": getattr(exc, "error_detail", None) or {}}


def _quiet_library_warnings() -> None:
    """As in the sidecar and its workers: a library's FutureWarning is not the user's output (it went to the
    demo's terminal through the worker's stderr); MLSIDECAR_LOG_LEVEL=DEBUG shows them on stderr."""
    import warnings

    if os.environ.get("MLSIDECAR_LOG_LEVEL", "").upper() != "DEBUG":
        warnings.showwarning = lambda *args, **kwargs: None


def main() -> None:
    wire = os.dup(1)
    os.dup2(2, 1)  # stray prints from C libraries go to stderr, never into the result lines
    _quiet_library_warnings()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    out = Reporter(wire)
    spec = json.loads(sys.stdin.readline())

    def watch_stdin() -> None:
        sys.stdin.read()  # returns when the parent closes the pipe or dies
        os._exit(3)

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        out.send({"result": run(spec, out)})
    except BaseException as exc:  # noqa: BLE001 - any failure fails this model's row only
        import traceback

        traceback.print_exc()
        out.send({"error": _error(exc)})
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
