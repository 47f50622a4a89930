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


class Spare:
    """One worker process started ahead of the next job, waiting for it with Python, our modules and
    llama.cpp loaded: a job that finds it starts about half a second sooner (bench/quantize.py).

    It is started when a worker job ends (a sidecar that never runs one never pays for it), it is the
    same fresh process a job would have spawned (nothing of an earlier job is in it), and it is
    stopped after SPARE_IDLE_S unused or with the sidecar.
    """

    def __init__(self) -> None:
        self._closed = False  # the sidecar is stopping: no new spare
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task | None = None
        self._expiry: asyncio.TimerHandle | None = None

    async def take(self, config: Config) -> asyncio.subprocess.Process:
        """The waiting spare if it is alive, else a new worker."""
        if self._starting is not None and not self._starting.done():
            await asyncio.shield(self._starting)
        proc, self._proc = self._proc, None
        if self._expiry is not None:
            self._expiry.cancel()
        if proc is not None and _alive(proc):
            return proc
        if proc is not None:
            _kill(proc)
            await proc.wait()
        return await _spawn(config)

    def prepare(self, config: Config) -> None:
        """Start a spare for the next job, unless one is waiting or starting."""
        if self._closed or not config.spare_worker or self._proc is not None or (self._starting and not self._starting.done()):
            return
        self._starting = asyncio.get_running_loop().create_task(self._start(config))

    async def _start(self, config: Config) -> None:
        try:
            self._proc = await _spawn(config, "--preload")
        except OSError as exc:
            log.warning("could not start a spare worker: %s", exc)
            return
        self._expiry = asyncio.get_running_loop().call_later(SPARE_IDLE_S, self.stop)

    def close(self) -> None:
        """The sidecar is stopping: stop the spare, and start none after the jobs still finishing."""
        self._closed = True
        self.stop()

    def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)


SPARE_IDLE_S = 300.0
spare = Spare()


def _alive(proc: asyncio.subprocess.Process) -> bool:
    """Not exited, and not a zombie the event loop has yet to reap (a spare killed while it waited)."""
    if proc.returncode is not None:
        return False
    try:
        state = open(f"/proc/{proc.pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # no /proc at all (macOS): trust returncode
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


async def _spawn(config: Config, *args: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, MLSIDECAR_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.worker_process", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, limit=max(config.max_message_bytes, 1 << 20),
        start_new_session=True,  # a terminal's Ctrl-C reaches the sidecar, which cancels; not the workers directly
    )


async def _run_in_worker(job: "Job", config: Config) -> None:
    params = _params_to_builtins(job.params)
    run_id = job.services.registry.start_run(job.method, params)  # before the spawn: no worker left idling if this fails
    for attempt in (1, 2):
        try:
            proc = await (spare.take(config) if attempt == 1 else _spawn(config))
        except OSError as exc:
            error = RpcError.failed("worker_crashed", f"could not start a worker process: {exc}", retryable=True)
            _record_run(job, run_id, {"error": error})
            job.finish(error=error)
            return
        final, tail, took_it = await _attend(job, config, proc, params, run_id)
        if took_it or job.cancelled.is_set():
            break
        # it died before it said it had the job (a spare killed while it waited): nothing ran, so run it afresh
        log.warning("worker %s %s before it took job %r; starting another", proc.pid, describe_exit(proc.returncode or 0), job.id)
    outcome = _outcome(final, proc.returncode or 0, job, tail)
    _record_run(job, run_id, outcome)
    job.finish(**outcome)
    spare.prepare(config)


async def _attend(job: "Job", config: Config, proc: asyncio.subprocess.Process, params: Any,
                  run_id: str) -> tuple[dict[str, Any] | None, collections.deque[str], bool]:
    """Give the worker its job and relay until it ends: (its final message, its stderr tail, whether it took the job)."""
    job.pid = proc.pid
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    stderr_task = asyncio.create_task(_forward_stderr(proc, tail))
    killer: list[asyncio.TimerHandle] = []
    took_it: list[bool] = []

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
        final = await _relay_events(proc, job, took_it)
        if _answered(final):
            # answered: the worker exits by itself, and waiting for that (~6 ms) need not hold up the answer
            _reaping.add(task := asyncio.create_task(_reap(proc, stderr_task, config.cancel_grace_s)))
            task.add_done_callback(_reaping.discard)
        else:
            await proc.wait()
            await stderr_task
    except asyncio.CancelledError:
        _record_run(job, run_id, {"error": RpcError.cancelled()})
        raise
    finally:
        job.on_cancel.remove(on_cancel)
        for handle in killer:
            handle.cancel()
        if not _answered(final):
            if proc.returncode is None:
                _kill(proc)
                await proc.wait()
            if not stderr_task.done():
                stderr_task.cancel()
    return final, tail, bool(took_it)


_reaping: set[asyncio.Task] = set()  # exits of workers that have answered


def _answered(final: dict[str, Any] | None) -> bool:
    return final is not None and "result" in final


async def _reap(proc: asyncio.subprocess.Process, stderr_task: asyncio.Task, grace_s: float) -> None:
    """Wait for an answered worker to exit (its last stderr lines still reach ours); one that lingers is killed."""
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        _kill(proc)
        await proc.wait()
    try:
        await asyncio.wait_for(stderr_task, 1.0)
    except asyncio.TimeoutError:
        stderr_task.cancel()


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


async def _relay_events(proc: asyncio.subprocess.Process, job: "Job", took_it: list[bool]) -> dict[str, Any] | None:
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
        if event == "started":
            took_it.append(True)
        elif event == "progress":
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
