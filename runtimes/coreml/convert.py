"""A Hugging Face causal LM to one multifunction .mlpackage with a stateful KV cache.

Per function (prefill: a fixed chunk of tokens; decode: one token; embed: pooled, normalised
hidden states of a chunk) the export-friendly decoder (decoder.py) is traced with torch.jit.trace
and converted by coremltools (iOS 18 / macOS 15, float16 compute, int32 inputs, float32 outputs,
the KV cache as two float16 states). Each function's package is compressed on its own when asked
(compress.py: coremltools refuses multifunction models), then save_multifunction assembles them,
deduplicating the identical weights into one copy.

coremltools' conversions are long uninterruptible calls: each runs in a thread while the caller's
thread watches the cancel flag; a cancel stops waiting at once and the scratch folder goes with
the caller's temporary directory (an abandoned conversion only works in memory and in its own
system temporary directory; it ends with the worker process).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel

FUNCTIONS = ("prefill", "decode", "embed")
STATES = ("key_cache", "value_cache")
Progress = Callable[[str, int, int, str], None]


class ConvertCancelled(Exception):
    """The caller's cancel flag was set during the export; nothing it wrote is kept."""


class ConvertFailed(Exception):
    error_kind = "conversion_failed"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.error_detail = detail


@dataclass
class Request:
    model_dir: Path
    package: Path  # the .mlpackage to write (must not exist)
    scratch: Path  # per-function packages; the caller removes it
    context_length: int
    prefill_length: int
    functions: tuple[str, ...]
    plan: Any = None  # compress.Plan
    progress: Progress = lambda stage, step, total, message: None
    cancelled: threading.Event = field(default_factory=threading.Event)


def _watch(work: Callable[[], Any], cancelled: threading.Event, poll_s: float = 0.1) -> Any:
    """Run work() in a daemon thread; raise ConvertCancelled as soon as the flag is set."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="coremltools", daemon=True)
    thread.start()
    while thread.is_alive():
        if cancelled.is_set():
            raise ConvertCancelled()
        thread.join(poll_s)
    if cancelled.is_set():
        raise ConvertCancelled()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _quiet() -> None:
    """coremltools' progress bars and the 'untested torch version' notice go to stderr, per op."""
    import logging
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def example_inputs(function: str, request: Request) -> tuple[Any, ...]:
    import torch

    length = 1 if function == "decode" else request.prefill_length
    ids = torch.zeros(1, length, dtype=torch.int32)
    count = torch.tensor([length], dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32)
    return {"prefill": (ids, zero, count), "decode": (ids, zero), "embed": (ids, count)}[function]


def interface(function: str, request: Request, cache_shape: tuple[int, ...]) -> dict[str, Any]:
    """The coremltools inputs, outputs and states of a function."""
    import coremltools as ct
    import numpy as np

    length = 1 if function == "decode" else request.prefill_length
    inputs = [ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32)]
    if function != "embed":
        inputs.append(ct.TensorType(name="position", shape=(1,), dtype=np.int32))
    if function != "decode":
        inputs.append(ct.TensorType(name="length", shape=(1,), dtype=np.int32))
    outputs = [ct.TensorType(name="embedding" if function == "embed" else "logits", dtype=np.float32)]
    states = [] if function == "embed" else [
        ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name=name) for name in STATES]
    return {"inputs": inputs, "outputs": outputs, "states": states}


def convert_function(decoder: Any, function: str, request: Request) -> Any:
    """One function as a Core ML model (in memory)."""
    import coremltools as ct
    import torch

    from runtimes.coreml.decoder import Embed, Step

    module = (Embed if function == "embed" else Step)(decoder).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(function, request), check_trace=False)
    if function != "embed":
        decoder.reset_cache()  # tracing ran the module once: the state's initial value is zeros
    shape = tuple(decoder.key_cache.shape) if function != "embed" else ()
    return ct.convert(traced, **interface(function, request, shape), minimum_deployment_target=ct.target.iOS18,
                      compute_precision=ct.precision.FLOAT16, convert_to="mlprogram", skip_model_load=True)


def export(request: Request) -> dict[str, Any]:
    """Write request.package; returns its description, the compression's leftovers and the plan's label."""
    import torch

    from runtimes.coreml import compress, spec
    from runtimes.coreml.decoder import load_decoder, read_spec

    from runtimes.coreml import encoder as encoders

    _quiet()
    report = request.progress
    started = time.perf_counter()
    if encoders.is_encoder(request.model_dir):  # BertModel: one embed function over enumerated lengths
        if request.functions != ("embed",):
            raise ValueError("an encoder exports only the embed function")
        model_spec = encoders.read_encoder_spec(request.model_dir)
        architecture = "BertModel"
        check_lengths(model_spec.max_positions, request.context_length, 1)
        report("load", 0, 1, "loading BertModel weights into the export module")
        decoder = encoders.load_encoder(request.model_dir)
        shapes = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    else:
        model_spec = read_spec(request.model_dir)
        architecture = model_spec.architecture
        check_lengths(model_spec.max_positions, request.context_length, request.prefill_length)
        report("load", 0, 1, f"loading {architecture} weights into the export module")
        decoder = load_decoder(request.model_dir, request.context_length, cache_dtype=torch.float16, spec=model_spec)
        shapes = {name: tuple(t.shape) for name, t in decoder.state_dict().items()
                  if not (model_spec.tied and name == "lm_head.weight")}
    hf_names = list(shapes)
    steps = len(request.functions) * (2 if request.plan else 1) + 1
    step = 0
    packages: dict[str, Path] = {}
    timings: dict[str, float] = {}
    uncompressed: list[dict[str, Any]] = []
    fallbacks: list[dict[str, Any]] = []
    memo = compress.KMeansMemo()
    request.scratch.mkdir(parents=True, exist_ok=True)
    for function in request.functions:
        report("convert", step, steps, f"tracing and converting {function}")
        began = time.perf_counter()
        try:
            work = ((lambda: encoders.convert_embed(decoder, request.context_length)) if architecture == "BertModel"
                    else (lambda: convert_function(decoder, function, request)))
            mlmodel = _watch(work, request.cancelled)
        except (ConvertCancelled, UnsupportedModel):
            raise
        except Exception as exc:  # noqa: BLE001 - coremltools' own errors, said with the function
            raise ConvertFailed(f"coremltools could not convert the {function} function: {type(exc).__name__}: {exc}",
                                function=function) from exc
        timings[f"convert_{function}_s"] = round(time.perf_counter() - began, 3)
        step += 1
        if request.plan is not None:
            report("compress", step, steps, f"compressing {function} ({request.plan.label()})")
            began = time.perf_counter()
            consts = spec.program_consts(mlmodel)
            parameters = spec.parameter_names(consts, hf_names)
            mlmodel = _watch(lambda: compress.compress_model(mlmodel, request.plan, parameters, memo), request.cancelled)
            timings[f"compress_{function}_s"] = round(time.perf_counter() - began, 3)
            if function == request.functions[0]:
                uncompressed = compress.uncompressed(mlmodel, request.plan, parameters, shapes)
                fallbacks = compress.fallbacks(consts, request.plan, parameters)
            step += 1
        path = request.scratch / f"{function}.mlpackage"
        mlmodel.save(str(path))
        packages[function] = path
        if request.cancelled.is_set():
            raise ConvertCancelled()
    report("assemble", step, steps, f"assembling {', '.join(request.functions)} into one package")
    _watch(lambda: assemble(packages, request.package), request.cancelled)
    description = spec.describe(request.package)
    return {"description": description, "packages": packages, "uncompressed": uncompressed, "fallbacks": fallbacks,
            "timings": timings,
            "architecture": architecture, "spec": model_spec,
            "parameters": sum(p.numel() for p in decoder.parameters()),
            "seconds": round(time.perf_counter() - started, 3)}


def assemble(packages: dict[str, Path], out: Path) -> None:
    """One package whose functions share one copy of the weights (coremltools dedupes identical consts)."""
    import coremltools as ct

    descriptor = ct.utils.MultiFunctionDescriptor()
    for function, path in packages.items():
        descriptor.add_function(str(path), "main", function)
    descriptor.default_function_name = "decode" if "decode" in packages else next(iter(packages))
    ct.utils.save_multifunction(descriptor, str(out))


def check_lengths(max_positions: int, context_length: int, prefill_length: int) -> None:
    """ValueError naming the field and the limit (the handler checks first, with the request's names)."""
    if context_length > max_positions:
        raise ValueError(f"context_length {context_length} is beyond the model's max_position_embeddings {max_positions}")
    if prefill_length > context_length:
        raise ValueError(f"prefill_length {prefill_length} exceeds context_length {context_length}")


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
