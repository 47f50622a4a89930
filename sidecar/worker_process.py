"""The child side of a worker: run one long job and report over the private wire.

Started as `python -m sidecar.worker_process` by sidecar.workers. It dies with the sidecar:
PR_SET_PDEATHSIG on Linux, and everywhere a read of its stdin that ends when the sidecar goes.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from typing import Any

from sidecar import hostwatch, wire


class WorkerContext:
    """The same face as a Job in the sidecar (handlers.context.Context), speaking over the worker pipe."""

    def __init__(self, request_id: Any, method: str, services: Any, wire_out: int) -> None:
        self.id = request_id
        self.method = method
        self.run_id: str | None = None
        self.services = services
        self.cancelled = threading.Event()
        self._wire_out = wire_out
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._wire_out, view):]

    def progress(self, stage: str, step: int | None = None, total: int | None = None, message: str | None = None,
                 metrics: dict[str, float] | None = None) -> None:
        params = {"stage": stage, "step": step, "total": total, "message": message, "metrics": metrics}
        self.send({"event": "progress", "params": params})

    def token(self, text: str) -> None:
        if text:
            self.send({"event": "token", "text": text})

    def log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.send({"event": "log", "level": level, "message": message, "data": data})

    def check_cancelled(self, partial: dict[str, Any] | None = None) -> None:
        from protocol.errors import Cancelled

        if self.cancelled.is_set():
            raise Cancelled(partial)


def _fitting(message: dict[str, Any], config: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """A result too large for one protocol line goes to a file, and the answer says where (never a 'crash')."""
    data = wire.encode(message)
    if len(data) <= config.max_message_bytes - 4096:  # room for the envelope the sidecar wraps it in
        return message
    from protocol.errors import RpcError

    from runtimes.files import atomic_file

    dest = config.home / "outputs" / f"result-{spec.get('run_id') or os.getpid()}.json"
    with atomic_file(dest) as handle:
        handle.write(data)
    error = RpcError.failed("result_too_large", f"the result ({len(data)} bytes) exceeds maxMessageBytes "
                            f"({config.max_message_bytes}); it was written to {dest}", path=str(dest), size_bytes=len(data))
    return {"error": error.to_wire()}


def _read_lines(fd: int):
    splitter = wire.LineSplitter(1 << 30)
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        yield from splitter.feed(chunk)


def _preload() -> None:
    """A spare worker's head start: every worker method's module, the package versions a model card
    lists, and llama.cpp; not torch, whose ~250 MB would sit idle (a job that needs it imports it)."""
    from handlers import implementation
    from protocol.methods import METHODS
    from sidecar import failures, server, services  # noqa: F401
    from sidecar.registry import library_versions

    for name, method in METHODS.items():
        if method.runs_in == "worker":
            implementation(name)
    library_versions()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pass


def main() -> None:
    wire_in, wire_out = wire.isolate_stdio()
    faulthandler.enable()  # a segfault leaves a Python stack in the stderr tail the error carries
    hostwatch.arm_parent_death_signal(signal.SIGKILL)
    parent = int(os.environ.get("MLSIDECAR_PARENT_PID", "0"))
    if parent and os.getppid() != parent:
        os._exit(3)  # the sidecar died before we armed the signal
    if "--preload" in sys.argv:
        _preload()
    lines = _read_lines(wire_in)
    first = next(lines, None)
    if first is None:
        os._exit(0)  # a spare the sidecar stopped before giving it a job
    spec = wire.decode(first)
    os.write(wire_out, wire.encode({"event": "started"}))  # the job is ours: from here on a death is the job's

    import msgspec

    from handlers import implementation
    from protocol.methods import METHODS
    from sidecar.config import Config
    from sidecar.failures import error_from_exception
    from sidecar.services import Services
    from sidecar.server import route_library_warnings

    route_library_warnings()
    config = Config(**{**spec["config"], "home": __import__("pathlib").Path(spec["config"]["home"])})
    ctx = WorkerContext(spec["id"], spec["method"], Services(config, with_pool=False), wire_out)
    ctx.run_id = spec.get("run_id")

    def watch_stdin() -> None:
        for line in lines:
            if isinstance(line, bytes) and wire.decode(line).get("cancel"):
                ctx.cancelled.set()
        os._exit(3)  # stdin closed: the sidecar is gone, nobody is left to report to

    threading.Thread(target=watch_stdin, name="worker-stdin", daemon=True).start()
    try:
        params = msgspec.convert(spec["params"], METHODS[spec["method"]].params)
        result = implementation(spec["method"])(params, ctx)
        ctx.send(_fitting({"result": msgspec.to_builtins(result)}, config, spec))
    except BaseException as exc:  # noqa: BLE001 - everything becomes the job's one error
        error = error_from_exception(exc)
        if error.code == -32603:
            import traceback

            traceback.print_exc()
        ctx.send({"error": error.to_wire()})
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
