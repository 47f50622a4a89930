"""Long jobs in worker processes: spawn, relay events, cancel, and survive any way a worker dies.

One fresh process per job: a crash, a leak or an out-of-memory kill takes that job only, and the
memory a training run used goes back to the system when it ends. The worker speaks NDJSON on its
stdin/stdout (isolated like the sidecar's own), and its stderr is forwarded to ours with a tail kept
for the error a crash produces.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from protocol.errors import ErrorCode, RpcError
from sidecar import wire
from sidecar.config import Config

if TYPE_CHECKING:
    from sidecar.jobs import Job

log = logging.getLogger("sidecar.workers")
STDERR_TAIL_LINES = 40


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {returncode}"


async def run_in_worker(job: "Job", config: Config) -> None:
    """Run the job in a fresh worker; whatever fails on the way (the registry, the spawn, a bug), the job is answered."""
    try:
        await _run_in_worker(job, config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a request must never be left without its response
        from sidecar.failures import error_from_exception

        log.exception("worker job %r (%s) failed before or around its worker", job.id, job.method)
        if not job.finished:
            job.finish(error=error_from_exception(exc))


async def _run_in_worker(job: "Job", config: Config) -> None:
    params = _params_to_builtins(job.params)
    run_id = job.services.registry.start_run(job.method, params)  # before the spawn: no worker left idling if this fails
    env = dict(os.environ, MLSIDECAR_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar.worker_process",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, limit=max(config.max_message_bytes, 1 << 20),
            start_new_session=True,  # a terminal's Ctrl-C reaches the sidecar, which cancels; not the workers directly
        )
    except OSError as exc:
        error = RpcError.failed("worker_crashed", f"could not start a worker process: {exc}", retryable=True)
        _record_run(job, run_id, {"error": error})
        job.finish(error=error)
        return
    job.pid = proc.pid
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    stderr_task = asyncio.create_task(_forward_stderr(proc, tail))
    killer: list[asyncio.TimerHandle] = []

    def send(message: dict[str, Any]) -> None:
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(wire.encode(message))

    def on_cancel() -> None:
        send({"cancel": True})
        killer.append(asyncio.get_running_loop().call_later(config.cancel_grace_s, _kill, proc))

    job.on_cancel.append(on_cancel)
    final: dict[str, Any] | None = None
    try:
        send({"id": job.id, "method": job.method, "params": params, "config": config.to_worker(), "run_id": run_id})
        if job.cancelled.is_set():
            on_cancel()
        final = await _relay_events(proc, job)
        await proc.wait()
        await stderr_task
    except asyncio.CancelledError:
        _record_run(job, run_id, {"error": RpcError.cancelled()})
        raise
    finally:
        for handle in killer:
            handle.cancel()
        if proc.returncode is None:
            _kill(proc)
            await proc.wait()
        if not stderr_task.done():
            stderr_task.cancel()
    outcome = _outcome(final, proc.returncode or 0, job, tail)
    _record_run(job, run_id, outcome)
    job.finish(**outcome)


def _record_run(job: "Job", run_id: str, outcome: dict[str, Any]) -> None:
    error = outcome.get("error")
    if error is None:
        status = "succeeded"
    else:
        status = "cancelled" if error.code == ErrorCode.CANCELLED else "failed"
    try:
        job.services.registry.finish_run(run_id, status, error.to_wire() if error else None)
    except Exception:  # noqa: BLE001 - bookkeeping must never change the request's answer
        log.exception("could not record the end of run %s", run_id)


def _outcome(final: dict[str, Any] | None, returncode: int, job: "Job", tail: collections.deque[str]) -> dict[str, Any]:
    if final is not None and "result" in final:
        return {"result": final["result"]}
    if final is not None and "error" in final:
        error = final["error"]
        return {"error": RpcError(error.get("code", ErrorCode.INTERNAL_ERROR), error.get("message", "worker error"), error.get("data"))}
    if job.cancelled.is_set():
        return {"error": RpcError.cancelled({"reason": "the worker was stopped after the cancel grace period"})}
    how = describe_exit(returncode)
    return {"error": RpcError.failed(
        "worker_crashed",
        f"the worker process running {job.method} {how}; the sidecar is still serving, retry or report the stderr tail",
        retryable=True, returncode=returncode, stderr_tail="\n".join(tail),
    )}


def _params_to_builtins(params: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(params)


async def _relay_events(proc: asyncio.subprocess.Process, job: "Job") -> dict[str, Any] | None:
    assert proc.stdout is not None
    while True:
        try:
            line = await proc.stdout.readline()
        except ValueError:  # a line over the limit: the worker broke the protocol
            log.error("worker %s sent an oversized line", proc.pid)
            return None
        if not line:
            return None
        try:
            message = wire.decode(line)
        except Exception:  # noqa: BLE001 - not ours: the worker's wire is isolated, so this is a bug
            log.error("worker %s sent a bad line: %r", proc.pid, line[:200])
            continue
        event = message.get("event")
        if event == "progress":
            job.progress(**message["params"])
        elif event == "token":
            job.token(message["text"])
        elif event == "log":
            job.log(message["level"], message["message"], message.get("data"))
        elif "result" in message or "error" in message:
            return message


async def _forward_stderr(proc: asyncio.subprocess.Process, tail: collections.deque[str]) -> None:
    assert proc.stderr is not None
    prefix = f"[worker {proc.pid}] ".encode()
    while True:
        line = await proc.stderr.readline()
        if not line:
            return
        tail.append(line.decode("utf-8", "replace").rstrip("\n"))
        try:
            os.write(2, prefix + line)
        except OSError:
            pass


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
