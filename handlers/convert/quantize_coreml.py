"""`quantize` with format coreml, in a worker: a compressed Core ML package, as an export with
`quantization` (handlers/convert/export_coreml.py).

coremltools cannot compress a multifunction package, and the accuracy report needs the torch
weights anyway, so the source is always the Hugging Face model: given a Core ML artifact, the
model it was exported from (its manifest records the path, the context and prefill lengths and
the functions) is exported again with the compression, and the new artifact names the old one
as a parent. Given a Hugging Face model, it is exported with the export defaults.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from handlers.context import Context
from handlers.convert.export import _read_json, resolve_model
from handlers.convert.export_coreml import plan_job, run_job
from protocol import messages as m
from protocol.errors import RpcError


def quantize_coreml(params: m.QuantizeParams, ctx: Context) -> m.QuantizeResult:
    started = time.perf_counter()
    if params.type is not None:
        raise RpcError.invalid_params("params.type", "applies to format gguf; for coreml give `quantization`")
    if params.quantization is None:
        raise RpcError.invalid_params("params.quantization", 'required for coreml: e.g. {"mode": "palettize", "nbits": 4, '
                                                             '"granularity": "per_grouped_channel", "group_size": 16}')
    source = resolve_model(ctx, params.model, "params.model")
    manifest = _read_json(source.path / "manifest.json") if source.path.is_dir() else {}
    reference, settings, parents, source_bytes = params.model, {}, [], None
    if manifest.get("format") == "coreml":
        base = (manifest.get("base_model") or {}).get("path")
        if manifest.get("adapters"):
            raise RpcError.failed("unsupported_model", f"{source.path} was exported with adapters merged in; quantize "
                                  "the model with adapters through export (format coreml, with quantization)",
                                  path=str(source.path))
        if not base or not (Path(base) / "config.json").is_file():
            raise RpcError.failed("model_not_found", f"the model {source.path} was exported from ({base}) is gone; a Core "
                                  "ML package cannot be compressed without it (coremltools refuses multifunction "
                                  "packages): export again from the model", path=str(source.path), source=base)
        reference, settings = base, manifest.get("coreml") or {}
        parents = [source.artifact_id] if source.artifact_id else []
        source_bytes = (manifest.get("metrics") or {}).get("size_bytes")
    quantization = msgspec.to_builtins(params.quantization)
    job = plan_job(ctx, reference, [], settings.get("context_length"), settings.get("prefill_length"),
                   settings.get("functions"), quantization, "params.quantization", params.output, params.name,
                   msgspec.to_builtins(params), params.options, parents=parents)
    built = run_job(job, ctx)
    size = built["size_bytes"]
    if source_bytes is None:
        source_bytes = sum(p.stat().st_size for p in job.model.path.glob("*.safetensors"))
    return m.QuantizeResult(artifact=built["artifact"], format="coreml", path=built["path"], type=job.plan.label(),
                            size_bytes=size, source_size_bytes=source_bytes,
                            ratio=round(size / source_bytes, 4) if source_bytes else 0.0,
                            seconds=round(time.perf_counter() - started, 3), files=built["files"], warnings=job.warnings,
                            quantization_report=built["quantization_report"])
