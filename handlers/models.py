"""models/list, models/load, models/unload: the pool as the host sees it."""

from __future__ import annotations

import asyncio

import msgspec

from handlers.context import Context
from protocol import messages as m
from protocol.errors import RpcError


def load_options(options: m.LoadOptions) -> dict:
    return {k: v for k, v in msgspec.structs.asdict(options).items() if v is not None}


async def resolve(ctx: Context, reference: str):
    def progress(step: int, total: int, message: str) -> None:
        ctx.progress("resolve", step, total, message)

    return await asyncio.to_thread(ctx.services.models.resolve, reference, progress)


async def list_models(params: m.Empty, ctx: Context) -> m.ModelsListResult:
    return m.ModelsListResult(ctx.services.pool.models())


async def load_model(params: m.ModelsLoadParams, ctx: Context) -> m.ModelInfo:
    from runtimes.registry import pick_runtime
    from sidecar.pool import InvalidKeepAlive

    try:
        from sidecar.pool import parse_keep_alive

        parse_keep_alive(params.keep_alive)
    except InvalidKeepAlive as exc:
        raise RpcError.invalid_params("params.keep_alive", str(exc)) from None
    resolved = await resolve(ctx, params.model)
    runtime = pick_runtime(resolved.path, params.runtime)

    def progress(step: int, total: int, message: str) -> None:
        ctx.progress("load", step, total, message)

    lease = await ctx.services.pool.acquire(params.model, resolved.path, runtime, load_options(params.options),
                                            params.keep_alive, progress, lambda text: ctx.log("warning", text))
    lease.release()  # loading is all this request wanted; keep_alive decides how long the model stays
    return lease.entry.info()


async def unload_model(params: m.ModelsUnloadParams, ctx: Context) -> m.ModelsUnloadResult:
    resolved = await resolve(ctx, params.model)
    return m.ModelsUnloadResult(await ctx.services.pool.unload(str(resolved.path), params.runtime))
