"""Diagnostic methods (only with --debug): they exercise the job engine the way the real methods will."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time

from handlers.context import Context
from protocol import messages as m
from protocol.errors import Cancelled


def sleep(params: m.DebugSleepParams, ctx: Context) -> m.DebugSleepResult:
    """Runs in a worker process: sleeps in slices, reporting progress and honouring $/cancel."""
    steps = max(1, params.steps)
    if params.write_stdout:
        print("debug/sleep: print() from a worker", flush=True)
        os.write(1, b"debug/sleep: os.write(1) from a worker\n")
    started = time.monotonic()
    for step in range(steps):
        if ctx.cancelled.wait(params.seconds / steps):
            raise Cancelled({"step": step, "slept_s": round(time.monotonic() - started, 3)})
        ctx.progress("sleep", step + 1, steps, f"slept {step + 1}/{steps}")
    if params.fail:
        raise RuntimeError(params.fail)
    return m.DebugSleepResult(steps, round(time.monotonic() - started, 3), os.getpid())


async def stream(params: m.DebugStreamParams, ctx: Context) -> m.DebugStreamResult:
    """Streams tokens from inside the sidecar, as generation does, with backpressure."""
    for index in range(params.count):
        ctx.token(params.text)
        if params.delay_ms:
            await asyncio.sleep(params.delay_ms / 1000)
        elif index % 256 == 255:
            await ctx.drain()
            await asyncio.sleep(0)
    return m.DebugStreamResult(params.count, params.text * min(params.count, 1))


def crash(params: m.DebugCrashParams, ctx: Context) -> m.EmptyResult:
    """Runs in a worker process and ends it the chosen way."""
    ctx.progress("crash", 0, 1, f"about to crash: {params.mode}")
    time.sleep(params.after_s)
    print(f"debug/crash: crashing with {params.mode}", file=sys.stderr, flush=True)
    if params.mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif params.mode == "segfault":
        ctypes.string_at(0)
    elif params.mode == "exit":
        os._exit(17)
    elif params.mode == "memory_error":
        raise MemoryError("debug/crash asked for a MemoryError")
    raise RuntimeError("debug/crash asked for an exception")


async def print_to_stdout(params: m.Empty, ctx: Context) -> m.DebugPrintResult:
    """Writes to fd 1 every way a library might; none of it may reach the wire."""
    print("debug/print: print() from the sidecar", flush=True)
    os.write(1, b"debug/print: os.write(1) from the sidecar\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import os, sys; print('debug/print: child print'); sys.stdout.flush(); os.write(1, b'debug/print: child os.write(1)\\n')",
    )
    await proc.wait()
    return m.DebugPrintResult(["print", "os.write(1)", "child print", "child os.write(1)"])
