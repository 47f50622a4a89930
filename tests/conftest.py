"""Fixtures for end-to-end tests: a real `python -m sidecar` over real pipes, in a private home."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' bars in tests run in-process, as the sidecar's workers do

from sidecar.client import SidecarProcess  # noqa: E402


class Sidecar(SidecarProcess):
    """SidecarProcess that records everything it reads, for assertions about events and responses."""

    def __init__(self, args: list[str], env: dict[str, str], stderr_path: Path, cwd: str | None = None,
                 new_session: bool = False) -> None:
        self.stderr_file = open(stderr_path, "wb")  # noqa: SIM115 - closed in close()
        super().__init__(args, env=env, stderr=self.stderr_file, cwd=cwd, new_session=new_session)
        self.stderr_path = stderr_path
        self.seen: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any] | None:
        message = super().read()
        if message is not None:
            self.seen.append(message)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole response message (result or error), events collected in self.seen."""
        return self.wait_response(self.start(method, params))

    def events(self, request_id: Any, method: str | None = None) -> list[dict[str, Any]]:
        return [m["params"] for m in self.seen if "method" in m and m["params"].get("id") == request_id
                and (method is None or m["method"] == method)]

    def stderr(self) -> str:
        if not self.stderr_file.closed:
            self.stderr_file.flush()
        return self.stderr_path.read_text(errors="replace")

    def close(self, timeout: float = 30.0) -> int:
        try:
            return super().close(timeout)
        finally:
            self.stderr_file.close()


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the session, so builtin:tiny is built once."""
    return tmp_path_factory.mktemp("home")


def sidecar_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIDECAR_") and k != "TQDM_DISABLE"}  # the sidecar's own
    env.update({"MLSIDECAR_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, **extra)
    return env


@pytest.fixture
def spawn(tmp_path: Path, shared_home: Path) -> Iterator[Any]:
    started: list[Sidecar] = []

    def start(*args: str, home: Path | None = None, cwd: str | None = None, new_session: bool = False, **env: str) -> Sidecar:
        sidecar = Sidecar(list(args), sidecar_env(home or shared_home, **env), tmp_path / f"stderr-{len(started)}.log", cwd=cwd,
                          new_session=new_session)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        if sidecar.proc.poll() is None:
            sidecar.proc.kill()
        sidecar.close(5)


@pytest.fixture
def sidecar(spawn: Any) -> Sidecar:
    return spawn("--debug")


class StallWatchdog:
    """Kills a process that shows no progress for stall_s. On a loaded machine the tiny build may take
    many minutes (pytest's timeout excludes fixtures for that reason), but it must keep moving."""

    def __init__(self, proc: Any, stall_s: float) -> None:
        self.proc, self.stall_s, self.last = proc, stall_s, time.monotonic()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def progressed(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            if time.monotonic() - self.last > self.stall_s:
                self.proc.kill()
                return


@pytest.fixture(scope="session")
def tiny_path(shared_home: Path) -> Path:
    """builtin:tiny, built once for the session through a real sidecar."""
    sidecar = Sidecar([], sidecar_env(shared_home), shared_home / "build-stderr.log")
    watchdog = StallWatchdog(sidecar.proc, stall_s=180)
    try:
        response = sidecar.wait_response(sidecar.start("models/load", {"model": "builtin:tiny", "keep_alive": 0}),
                                         on_event=lambda _: watchdog.progressed())
    finally:
        watchdog.stop()
        sidecar.close()
    assert "result" in response, response
    return Path(response["result"]["path"])
