"""`merge_lora`: fold PEFT LoRA/DoRA adapters into their base in a worker, check the result, register it.

Everything that can be refused is refused before a byte is written: the destination, the model
and each adapter (runtimes.hf.merge plans the whole merge against the base's headers first). The
merged directory is written into the registry's temporary sibling and verified there, so a failed
check, a full disk or a cancel leaves nothing at the destination.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import msgspec

from handlers.context import Context
from protocol import messages as m
from protocol.errors import RpcError


def merge_lora(params: m.MergeLoraParams, ctx: Context) -> m.MergeLoraResult:
    from handlers.outputs import destination
    from runtimes.hf.merge import merge_adapters

    started = time.perf_counter()
    services = ctx.services
    _validate(params)
    default_name = f"merged-{getattr(ctx, 'run_id', None) or int(time.time())}"

    def where() -> tuple[str, Path]:
        return destination(services, "models", output=params.output, name=params.name, default_name=default_name)

    where()  # a taken output is refused before anything is read
    model = _resolve(ctx, params.model, "params.model")
    _check_model(model.path, params.options.allow_pickle)
    adapters = [_resolve(ctx, ref.adapter, f"params.adapters[{i}].adapter") for i, ref in enumerate(params.adapters)]
    _check_adapters(adapters)
    pairs = [(a.path, ref.weight) for a, ref in zip(adapters, params.adapters)]
    ctx.check_cancelled()

    name, dest = where()
    parents = [r.artifact_id for r in (model, *adapters) if getattr(r, "artifact_id", None)]
    record = {**msgspec.to_builtins(params), "model_path": str(model.path), "adapter_paths": [str(a.path) for a in adapters]}
    with services.registry.write_artifact("model", dest, name=name, params=record, parents=list(dict.fromkeys(parents)),
                                          run_id=getattr(ctx, "run_id", None)) as pending:
        stats = merge_adapters(model.path, pairs, pending.path, dtype=params.dtype, allow_pickle=params.options.allow_pickle,
                               progress=lambda done, total, message: ctx.progress("merge", done, total, message),
                               cancelled=ctx.cancelled.is_set)
        verification = _verify(ctx, params, model.path, pairs, pending.path, stats["dtype"]) if params.verify else None
        ctx.check_cancelled({"stage": "save"})
        ctx.progress("save", 0, 1, f"registering the merged model at {dest}")
        pending.metrics = {k: stats[k] for k in ("tensors", "merged_tensors", "bytes", "shards", "dtype", "seconds")}
        if verification is not None:
            pending.metrics["max_abs_logit_diff"] = verification["max_abs_logit_diff"]
        pending.extra_manifest = {
            "base_model": {"reference": params.model, "path": str(model.path), "source": model.source},
            "adapters": [{"reference": ref.adapter, "path": str(a.path), "weight": ref.weight, "source": a.source}
                         for a, ref in zip(adapters, params.adapters)],
            "verification": verification,
        }
    ctx.progress("save", 1, 1, f"registered {pending.record.id}")
    return m.MergeLoraResult(
        artifact=m.Artifact(**pending.record.to_dict()),
        verification=None if verification is None else m.MergeVerification(
            probes=verification["probes"], max_abs_logit_diff=verification["max_abs_logit_diff"], dtype=verification["dtype"]),
        tensors=stats["tensors"], merged_tensors=stats["merged_tensors"], seconds=round(time.perf_counter() - started, 3))


def _validate(params: m.MergeLoraParams) -> None:
    if not params.model:
        raise RpcError.invalid_params("params.model", "required: the base model (a directory, an artifact id or an HF id)")
    if not params.adapters:
        raise RpcError.invalid_params("params.adapters", "give at least one adapter: [{\"adapter\": PATH_OR_ID, \"weight\": 1.0}]")
    for i, ref in enumerate(params.adapters):
        if not math.isfinite(ref.weight):
            raise RpcError.invalid_params(f"params.adapters[{i}].weight", f"must be a finite number, got {ref.weight}")


def _resolve(ctx: Context, reference: str, field: str) -> Any:
    """services.models.resolve, with the field named in a failure (its kind kept)."""
    try:
        return ctx.services.models.resolve(reference, lambda step, total, message: ctx.progress("resolve", step, total, message))
    except RpcError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the field, keep the kind
        exc.args = (f"{field}: {exc}",)
        raise


def _check_model(path: Path, allow_pickle: bool) -> None:
    from runtimes.hf.lm import check_model_dir

    if (path / "adapter_config.json").is_file():
        raise RpcError.failed("unsupported_model", f"{path} is a PEFT adapter, not a model: put it in `adapters` and give "
                              "the model it was trained on as `model`", path=str(path))
    check_model_dir(path, allow_pickle)


def _check_adapters(adapters: list[Any]) -> None:
    seen: dict[Path, int] = {}
    for i, adapter in enumerate(adapters):
        if not (adapter.path / "adapter_config.json").is_file():
            raise RpcError.failed("adapter_invalid", f"params.adapters[{i}].adapter: {adapter.path} is not a PEFT adapter "
                                  "directory (no adapter_config.json)", path=str(adapter.path))
        if adapter.path in seen:
            raise RpcError.invalid_params(f"params.adapters[{i}].adapter", f"{adapter.path} is listed twice (also at "
                                          f"[{seen[adapter.path]}]): list each adapter once, with the weights added up")
        seen[adapter.path] = i


def _verify(ctx: Context, params: m.MergeLoraParams, base: Path, adapters: list[tuple[Path, float]], merged: Path,
            dtype: str) -> dict[str, Any]:
    from runtimes.hf.merge_verify import verify_merge

    ctx.check_cancelled({"stage": "verify"})
    return verify_merge(base, adapters, merged, dtype=dtype, allow_pickle=params.options.allow_pickle,
                        trust_remote_code=params.options.trust_remote_code,
                        check_cancelled=lambda: ctx.check_cancelled({"stage": "verify"}),
                        progress=lambda step, total, message: ctx.progress("verify", step, total, message))
