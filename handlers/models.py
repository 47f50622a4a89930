"""models/list, models/load, models/unload: the pool as the host sees it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from handlers.context import Context
from protocol import messages as m
from protocol.errors import RpcError


def load_options(options: m.LoadOptions, runtime: str, ctx: Context) -> dict:
    """The options that define a pool entry; a GGUF LoRA adapter is part of what llama.cpp loads."""
    chosen = {k: v for k, v in msgspec.structs.asdict(options).items() if v is not None}
    lora_path, lora_scale = chosen.pop("lora_path", None), chosen.pop("lora_scale")
    if lora_path is not None:
        checked = ctx.services.paths.check(lora_path, must_exist=True)  # containment before anything else
        if runtime != "llama.cpp":
            raise RpcError.invalid_params("params.options.lora_path",
                                          "applies to GGUF models on llama.cpp; for transformers models use `adapters`")
        chosen["lora"] = (str(checked), lora_scale)
    return chosen


async def resolve(ctx: Context, reference: str):
    def progress(step: int, total: int, message: str) -> None:
        ctx.check_cancelled()  # a cancelled (or host-abandoned) build stops at its next step, leaving nothing
        ctx.progress("resolve", step, total, message)

    return await asyncio.to_thread(ctx.services.models.resolve, reference, progress)


async def list_models(params: m.Empty, ctx: Context) -> m.ModelsListResult:
    return m.ModelsListResult(ctx.services.pool.models())


async def acquire_model(ctx: Context, reference: str, runtime_name: str, options: m.LoadOptions,
                        keep_alive: m.KeepAlive | None, runtime_options: Callable[[str], dict] | None = None):
    """Resolve, pick the runtime and lease the model from the pool (loading it with progress if needed).

    runtime_options(runtime_name) adds load options that only one runtime needs (llama.cpp's embedding
    mode), once the runtime is known, so other runtimes keep sharing one pool entry."""
    from runtimes.registry import pick_runtime
    from protocol.keep_alive import InvalidKeepAlive, parse_keep_alive

    try:
        parse_keep_alive(keep_alive)
    except InvalidKeepAlive as exc:
        raise RpcError.invalid_params("params.keep_alive", str(exc)) from None
    resolved = await resolve(ctx, reference)
    runtime = pick_runtime(resolved.path, runtime_name)

    def progress(step: int, total: int, message: str) -> None:
        ctx.progress("load", step, total, message)

    return await ctx.services.pool.acquire(reference, resolved.path, runtime, {**load_options(options, runtime.name, ctx), **(runtime_options(runtime.name) if runtime_options else {})},
                                           keep_alive, progress, lambda text: ctx.log("warning", text))


async def load_model(params: m.ModelsLoadParams, ctx: Context) -> m.ModelInfo:
    lease = await acquire_model(ctx, params.model, params.runtime, params.options, params.keep_alive)
    lease.release()  # loading is all this request wanted; keep_alive decides how long the model stays
    return lease.entry.info()


async def unload_model(params: m.ModelsUnloadParams, ctx: Context) -> m.ModelsUnloadResult:
    resolved = await resolve(ctx, params.model)
    return m.ModelsUnloadResult(await ctx.services.pool.unload(str(resolved.path), params.runtime))
