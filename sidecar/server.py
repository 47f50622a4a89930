"""The dispatcher and lifecycle: reads frames, validates them, starts jobs, and shuts down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import msgspec

from protocol import messages as m
from protocol.errors import Cancelled, ErrorCode, RpcError
from protocol.methods import METHODS, MethodContract
from protocol.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS
from sidecar import hostwatch, wire, workers
from sidecar.config import Config
from sidecar.failures import error_from_exception, validation_error
from sidecar.jobs import Job
from sidecar.path_fields import check_path_fields
from sidecar.services import Services

log = logging.getLogger("sidecar")

# Requests that do not count as the implicit `initialize` (a host may probe liveness first).
_PRE_INIT_METHODS = {"initialize", "ping", "status"}
_MISSING = object()


class Server:
    def __init__(self, config: Config, wire_in: int, wire_out: int) -> None:
        self.config = config
        self.wire_in = wire_in
        self.wire_out = wire_out
        self.loop = asyncio.get_running_loop()
        self.writer = wire.WireWriter(self.loop)
        self.splitter = wire.LineSplitter(config.max_message_bytes)
        self.services = Services(config)
        self.started = time.time()
        self.active: dict[Any, Job] = {}
        self.running_long: list[Job] = []
        self.queue: deque[Job] = deque()
        self.initialized = False
        self.protocol_version = PROTOCOL_VERSION
        self.accepting = True
        self.host_pid: int | None = config.host_pid
        self._stopping: asyncio.Task | None = None
        self._done = asyncio.Event()
        self._original_ppid = os.getppid()
        self._background: set[asyncio.Task] = set()
        self._grace_deadline = float("inf")

    # ----- running

    async def serve(self) -> int:
        await self.writer.open(self.wire_out)
        await wire.open_reader(self.loop, self.wire_in, self.on_data, self.on_eof)
        self._install_signals()
        self._spawn(hostwatch.watch_host(self._original_ppid, lambda: self.host_pid, self.on_host_gone))
        self._spawn(asyncio.to_thread(self._sweep_temporaries))
        await self._done.wait()
        await self.writer.close()
        self.services.close()
        return 0

    def _sweep_temporaries(self) -> None:
        """Remove half-written artifact directories that a crashed process left behind."""
        from sidecar.registry import sweep_stale_temporaries

        home = self.config.home
        folders = [home / "models" / "builtin", home / "outputs", home / "artifacts", *_subfolders(home / "artifacts")]
        for run in _subfolders(home / "runs"):
            folders += [run, run / "checkpoints"]
        for folder in folders:
            if folder.is_dir():
                removed = sweep_stale_temporaries(folder)
                if removed:
                    log.info("removed %d stale temporary artifact(s) under %s", removed, folder)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self.loop.add_signal_handler(sig, self.stop, f"signal {signal.Signals(sig).name}", 1.0)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        death = hostwatch.parent_death_signal()
        try:
            self.loop.add_signal_handler(death, self._on_parent_death_signal)
            hostwatch.arm_parent_death_signal(death)
            if os.getppid() != self._original_ppid:
                self.on_host_gone("parent exited during start-up")
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def _on_parent_death_signal(self) -> None:
        if os.getppid() != self._original_ppid:
            self.on_host_gone(f"parent process {self._original_ppid} exited")

    # ----- input

    def on_data(self, data: bytes) -> None:
        self._dispatch(self.splitter.feed(data))

    def _dispatch(self, lines: list) -> None:
        for line in lines:
            if isinstance(line, wire.Oversize):
                self.send_error(None, RpcError(
                    ErrorCode.INVALID_REQUEST,
                    f"message larger than maxMessageBytes ({self.config.max_message_bytes} bytes); it was discarded. "
                    "Send bulk data as a file path instead.",
                    {"maxMessageBytes": self.config.max_message_bytes, "size_at_least": line.size_at_least},
                ))
            else:
                self._answer_line(line)
        self.writer.flush()  # answers to this chunk leave in this loop pass, not the next

    def on_eof(self) -> None:
        self._dispatch(self.splitter.finish())
        if os.getppid() != self._original_ppid:
            self.on_host_gone(f"parent process {self._original_ppid} exited")
        else:
            self._spawn(self._finish_input())

    async def _finish_input(self) -> None:
        """End of input from a live host means "nothing more to send" (a pipe typed by hand, a script):
        answer every request received, then stop. The host watch keeps running meanwhile, so a host
        that closed its end by dying (its pipes close just before it is reaped) still cancels the work."""
        while self.active and self._stopping is None:
            await asyncio.sleep(0.05)
        self.stop("end of input", self.config.cancel_grace_s)

    def on_host_gone(self, reason: str) -> None:
        log.warning("host gone (%s); shutting down", reason)
        self.writer.broken = True
        self.stop(reason, 0.5)

    def _answer_line(self, line: bytes) -> None:
        """The boundary for one incoming line: whatever it raises becomes that line's answer, never the session's end.

        A request whose job already exists gets its error through the job (so it is still answered
        exactly once); one that got no job is answered here with the id it carried, if any; a
        notification (or a line whose id cannot be read) gets nothing or an id-null error.
        """
        try:
            self.on_line(line)
        except Exception as exc:  # noqa: BLE001 - the whole point: one line can never end the session
            log.warning("a line failed in the dispatcher (%s: %s)", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            error = _line_error(exc)
            request_id = getattr(exc, "request_id", None)  # None: raised before the id was read
            if request_id is _MISSING:
                return  # raised while handling a notification: nothing to answer
            try:
                job = self.active.get(request_id) if request_id is not None else None
                if job is not None:
                    if not job.finished:
                        job.finish(error=error)
                else:
                    self.send_error(request_id, error)
            except Exception:  # noqa: BLE001 - not even the answer could be written: log it, keep serving
                log.exception("could not answer a line that failed")

    def on_line(self, line: bytes) -> None:
        try:
            message = wire.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            self.send_error(None, RpcError(ErrorCode.PARSE_ERROR, f"parse error: {reason}; send one JSON object per line"))
            return
        if not isinstance(message, dict):
            what = "a batch (JSON array)" if isinstance(message, list) else f"a JSON {type(message).__name__}"
            self.send_error(None, RpcError(ErrorCode.INVALID_REQUEST, f"invalid request: got {what}; send one JSON-RPC object per line"))
            return
        request_id = message.get("id", _MISSING)
        method = message.get("method")
        if message.get("jsonrpc", "2.0") != "2.0":
            self.send_error(self._safe_id(request_id), RpcError(ErrorCode.INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"'))
            return
        if request_id is not _MISSING and self._safe_id(request_id) is None:
            self.send_error(None, RpcError(ErrorCode.INVALID_REQUEST, "invalid request: id must be an integer or a string"))
            return
        if not isinstance(method, str):
            if "result" in message or "error" in message:
                return  # a response from the host: nothing of ours asks it anything yet
            self.send_error(self._safe_id(request_id), RpcError(ErrorCode.INVALID_REQUEST, 'invalid request: "method" must be a string'))
            return
        params = message.get("params")
        try:
            if request_id is _MISSING:
                self.on_notification(method, params)
            else:
                self.on_request(request_id, method, params)
        except Exception as exc:
            exc.request_id = request_id  # type: ignore[attr-defined]  # for _answer_line; _MISSING: a notification
            raise

    @staticmethod
    def _safe_id(request_id: Any) -> Any:
        """The id if it is one JSON-RPC allows and we can write back (an int in 64 bits, or a string), else None."""
        if isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool)
                                           and -2**63 <= request_id < 2**64):
            return request_id
        return None

    def on_notification(self, method: str, params: Any) -> None:
        if method == "$/cancel" and isinstance(params, dict) and self._safe_id(params.get("id")) is not None:
            job = self.active.get(params["id"])
            if job is not None and job.method != "shutdown":
                job.request_cancel()
        # other notifications are ignored, as JSON-RPC asks

    # ----- requests

    def on_request(self, request_id: Any, method: str, raw_params: Any) -> None:
        if method == "ping" and not raw_params and request_id not in self.active:
            self.writer.send(wire.encode({"jsonrpc": "2.0", "id": request_id, "result": {}}))
            return  # the hot path of liveness checks: nothing to validate, nothing to track
        if request_id in self.active:
            self.send_error(None, RpcError(ErrorCode.INVALID_REQUEST,
                                           f"invalid request: id {request_id!r} is already in flight; use a new id per request",
                                           {"id": request_id}))
            return
        try:
            contract = self._contract(method)
            if raw_params is not None and not isinstance(raw_params, dict):
                raise RpcError.invalid_params("params", "params must be a JSON object")
            try:
                params = msgspec.convert(raw_params or {}, contract.params)
            except msgspec.ValidationError as exc:
                raise validation_error(exc, "params") from None
            check_path_fields(params, self.services.paths)  # containment of every x-path field before any work
            if method not in _PRE_INIT_METHODS:
                if not self.initialized and self.config.strict:
                    raise RpcError(ErrorCode.NOT_INITIALIZED, "not initialized: send initialize first (strict mode)")
                self.initialized = True
            if not self.accepting and method not in {"ping", "status", "shutdown"}:
                raise RpcError.failed("shutting_down", "the sidecar is shutting down and accepts no new work; start a new process")
        except RpcError as error:
            self.send_error(request_id, error)
            return
        except Exception as exc:  # noqa: BLE001 - path_not_allowed from the containment check
            self.send_error(request_id, error_from_exception(exc))
            return
        job = Job(self, request_id, method, contract, params)
        self.active[request_id] = job
        if method == "ping":
            job.finish(result={})
        elif method == "status":
            job.finish(result=self.status())
        elif method == "initialize":
            self._finish_sync(job, self.initialize)
        elif method == "shutdown":
            self._start_inline(job, self.shutdown)
        elif contract.runs_in == "worker":
            self._submit_long(job)
        else:
            from handlers import implementation

            self._start_inline(job, implementation(method))

    def _contract(self, method: str) -> MethodContract:
        contract = METHODS.get(method)
        if contract is None or (contract.debug and not self.config.debug):
            hint = " (diagnostic methods need --debug)" if contract is not None else ""
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {method}{hint}", {"method": method})
        return contract

    def _finish_sync(self, job: Job, fn: Any) -> None:
        try:
            job.finish(result=fn(job.params))
        except Exception as exc:  # noqa: BLE001 - every failure becomes the request's one error
            job.finish(error=error_from_exception(exc))

    def _start_inline(self, job: Job, handler: Any) -> None:
        job.state = "running"
        job.started = time.time()
        job.task = self.loop.create_task(self._run_inline(job, handler))

    async def _run_inline(self, job: Job, handler: Any) -> None:
        try:
            result = await handler(job.params, job)
        except asyncio.CancelledError:
            job.finish(error=RpcError.cancelled())
        except Cancelled as exc:
            job.finish(error=RpcError.cancelled(exc.partial))
        except Exception as exc:  # noqa: BLE001
            error = error_from_exception(exc)
            if error.code == ErrorCode.INTERNAL_ERROR:
                log.exception("request %r (%s) failed", job.id, job.method)
            job.finish(error=error)
        else:
            job.finish(result=result)

    def send_error(self, request_id: Any, error: RpcError) -> None:
        self.writer.send(wire.encode({"jsonrpc": "2.0", "id": request_id, "error": error.to_wire()}))

    # ----- long jobs: a bounded queue in front of worker processes

    def _submit_long(self, job: Job) -> None:
        if len(self.running_long) < self.config.max_concurrent_jobs:
            self._start_long(job)
            return
        if len(self.queue) >= self.config.max_queued_jobs:
            self.active.pop(job.id, None)
            self.send_error(job.id, RpcError(ErrorCode.BUSY, f"busy: {len(self.queue)} jobs already queued; retry later",
                                             {"retryable": True, "queued": len(self.queue)}))
            return
        job.state = "queued"
        self.queue.append(job)
        self._announce_position(job, len(self.queue))

    def _announce_position(self, job: Job, position: int) -> None:
        job.position = position
        ahead = position - 1 + len(self.running_long)
        job.progress("queued", message=f"waiting: {ahead} job(s) ahead", position=position)

    def _start_long(self, job: Job) -> None:
        job.state = "running"
        job.position = None
        job.started = time.time()
        self.running_long.append(job)
        job.task = self.loop.create_task(workers.run_in_worker(job, self.config))

    def job_finished(self, job: Job) -> None:
        self.active.pop(job.id, None)
        if job in self.running_long:
            self.running_long.remove(job)
        if job in self.queue:
            self.queue.remove(job)
        while self.queue and len(self.running_long) < self.config.max_concurrent_jobs and self.accepting:
            self._start_long(self.queue.popleft())
        for position, queued in enumerate(self.queue, start=1):
            if queued.position != position:
                self._announce_position(queued, position)
        if self._stopping is not None and not self.active:
            self._done.set()

    # ----- lifecycle methods

    def initialize(self, params: m.InitializeParams) -> m.InitializeResult:
        if self.initialized:
            raise RpcError(ErrorCode.INVALID_REQUEST, "already initialized: initialize may be sent once, as the first request")
        if params.protocolVersion not in SUPPORTED_VERSIONS:
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           f"unsupported protocol version {params.protocolVersion!r}; this sidecar speaks {', '.join(SUPPORTED_VERSIONS)}",
                           {"supported": list(SUPPORTED_VERSIONS), "requested": params.protocolVersion})
        self.initialized = True
        self.protocol_version = params.protocolVersion
        if params.processId is not None:
            self.host_pid = params.processId
        if params.capabilities is not None and params.capabilities.allowNetwork:
            self.services.config.allow_network = True
        from sidecar.about import capabilities, server_info

        return m.InitializeResult(self.protocol_version, server_info(), capabilities(self.config))

    def status(self) -> m.StatusResult:
        jobs = [
            m.JobInfo(j.id, j.method, "queued" if j.state == "queued" else "running", j.started, j.position, j.stage, j.step, j.total, j.pid)
            for j in self.active.values()
            if j.method not in {"status", "ping"}
        ]
        pool = self.services.pool
        from runtimes import cpu_share
        from sidecar.threads import current

        threads = m.ThreadInfo(**current().to_dict(), **cpu_share.governor().snapshot())
        return m.StatusResult(round(time.time() - self.started, 3), jobs, pool.models(), pool.info(),
                              self.config.max_concurrent_jobs, self.config.max_queued_jobs, threads)

    async def shutdown(self, params: m.Empty, job: Job) -> m.ShutdownResult:
        self.accepting = False
        others = [j for j in self.active.values() if j is not job]
        for other in others:
            other.request_cancel()
        await self._wait_for(others, self.config.cancel_grace_s)
        workers.spare.close()
        await self.services.pool.close()
        return m.ShutdownResult([j.id for j in others])

    async def _wait_for(self, jobs: list[Job], grace_s: float) -> None:
        """Give cancelled jobs until the grace deadline to end by themselves (a worker checkpoints), then end them.

        The deadline is an attribute so that the host dying mid-wait can pull it in."""
        self._grace_deadline = min(self._grace_deadline, self.loop.time() + grace_s)
        while any(not j.finished for j in jobs) and self.loop.time() < self._grace_deadline:
            await asyncio.sleep(0.02)
        for j in jobs:
            if not j.finished:
                if j.task is not None:
                    j.task.cancel()
                j.finish(error=RpcError.cancelled({"reason": "did not stop within the grace period"}))

    def stop(self, reason: str, grace_s: float) -> None:
        """Stop for good: cancel everything, answer every request, then let serve() return."""
        self._grace_deadline = min(self._grace_deadline, self.loop.time() + grace_s)
        if self._stopping is not None:
            return
        log.info("stopping: %s", reason)
        self.accepting = False
        workers.spare.close()
        self._stopping = self._spawn(self._stop(grace_s))

    async def _stop(self, grace_s: float) -> None:
        jobs = list(self.active.values())
        for j in jobs:
            if j.method != "shutdown":
                j.request_cancel()
        await self._wait_for(jobs, grace_s)
        workers.spare.close()
        await self.services.pool.close()
        if not self.active:
            self._done.set()


def _subfolders(folder: Any) -> list:
    """The directories directly inside folder (none if it does not exist): where writers put their temporaries."""
    try:
        return [entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    except OSError:
        return []


def _line_error(exc: BaseException) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, RecursionError):
        return RpcError(ErrorCode.INVALID_REQUEST, "invalid request: the message is nested too deeply; flatten the params")
    return RpcError(ErrorCode.INTERNAL_ERROR, f"internal error while reading the request ({type(exc).__name__}: {exc}); "
                                               "the sidecar goes on serving; please report this with the request line")


async def serve(config: Config, wire_in: int, wire_out: int) -> int:
    server = Server(config, wire_in, wire_out)
    return await server.serve()


def route_library_warnings() -> None:
    """Libraries' warnings (transformers' FutureWarnings, say) go to the log at debug level, not between
    a user's results, and their tqdm progress bars (coremltools' passes) stay out of the stderr a host
    logs: our progress goes out as $/progress. MLSIDECAR_LOG_LEVEL=DEBUG shows both."""
    import warnings

    if os.environ.get("MLSIDECAR_LOG_LEVEL", "").upper() != "DEBUG":
        os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm (>= 4.66) when a bar is made

    library_log = logging.getLogger("sidecar.library")

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        library_log.debug("%s:%d: %s: %s", filename, lineno, category.__name__, message)

    warnings.showwarning = show


def _loop_factory() -> Any:
    """uvloop where installed (it halves the per-message cost of the loop); asyncio's own otherwise."""
    if os.environ.get("MLSIDECAR_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config: Config, wire_in: int, wire_out: int) -> None:
    level = os.environ.get("MLSIDECAR_LOG_LEVEL") or ("DEBUG" if config.debug else "INFO")
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s sidecar[%(process)d] %(levelname)s %(message)s")
    route_library_warnings()
    # Not `with asyncio.Runner(...)`: closing the runner joins the default executor's threads, and a
    # thread mid-way through a model build would hold the exit for minutes after the host is gone.
    runner = asyncio.Runner(loop_factory=_loop_factory())
    code = runner.run(serve(config, wire_in, wire_out))
    sys.stderr.flush()
    os._exit(code)
