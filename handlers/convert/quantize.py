"""`quantize` (format gguf) in a worker: llama.cpp's quantizer on a GGUF file, a GGUF artifact or a
Hugging Face model (converted to f16 first, in the same job, in a scratch folder that goes away).

It runs the export pipeline (handlers/convert/export.py) with the quantization step, so the artifact has
the same shape: a directory with `<name>.<TYPE>.gguf`, the Modelfile and the model card. The
quantization itself is one uninterruptible C call; a cancel stops waiting for it at once and
removes everything (the abandoned call ends with the worker process).
"""

from __future__ import annotations

import time

import msgspec

from handlers.context import Context
from handlers.convert.export import Plan, _destination, _quant_type, build, check_weights, file_stem, main_gguf, model_kind, \
    model_stem, resolve_model
from protocol import messages as m
from protocol.errors import RpcError


def quantize(params: m.QuantizeParams, ctx: Context) -> m.QuantizeResult:
    if params.format == "coreml":
        from handlers.convert.quantize_coreml import quantize_coreml

        return quantize_coreml(params, ctx)
    return quantize_gguf(params, ctx)


def quantize_gguf(params: m.QuantizeParams, ctx: Context) -> m.QuantizeResult:
    started = time.perf_counter()
    if params.quantization is not None:
        raise RpcError.invalid_params("params.quantization", "applies to format coreml; for gguf give `type`")
    if not params.type:
        raise RpcError.invalid_params("params.type", "required for gguf: a quantization type such as Q4_K_M")
    qtype = _quant_type(params.type, "params.type")
    _destination(ctx, params.output, params.name, "model", qtype)  # a taken output or a bad name: refused before any work
    model = resolve_model(ctx, params.model, "params.model")
    kind = model_kind(model.path)
    if kind == "other":
        raise RpcError.failed("unsupported_model", f"{model.path} is neither a GGUF file nor a Hugging Face model directory "
                              "(config.json and weights)", path=str(model.path))
    if kind == "hf":
        check_weights(model.path, params.options)
    gguf_source = main_gguf(model.path) if kind == "gguf" else None
    stem = model_stem(model)
    name, dest = _destination(ctx, params.output, params.name, stem, qtype)
    plan = Plan(model, gguf_source, [], False, "f16", qtype, params.modelfile, None, name, dest,
                file_stem(params.name, params.output, dest, stem), msgspec.to_builtins(params), params.options)
    built = build(plan, ctx)
    size = built.main.stat().st_size
    return m.QuantizeResult(artifact=built.artifact, format="gguf", path=str(built.main), type=qtype, size_bytes=size,
                            source_size_bytes=built.source_bytes,
                            ratio=round(size / built.source_bytes, 4) if built.source_bytes else 0.0,
                            seconds=round(time.perf_counter() - started, 3), files=built.files, warnings=built.warnings)
