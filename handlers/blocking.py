"""Blocking model work on a thread, without ever letting go of the model while the thread still uses it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from handlers.context import Context

T = TypeVar("T")


async def run_to_completion(ctx: Context, executor: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on `executor` (the model's engine thread). If the request is cancelled meanwhile, set
    ctx.cancelled (fn checks it between steps) and still wait for fn to return, so the caller's lease and
    lock outlive the computation."""
    work = asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        ctx.cancelled.set()
        return await work
