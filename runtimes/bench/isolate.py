"""Start one model's measurement process (runtimes/bench/child.py) and follow it to its answer.

The thread settings travel in its environment, the same for every model of a run: OMP_NUM_THREADS
and, unless the request inherits it, OMP_WAIT_POLICY. A cancel kills the process at once (it writes
nothing, so nothing is left behind); a crash becomes the row's error with the end of its stderr.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class ChildCancelled(Exception):
    pass


def child_env(threads: int, wait_policy: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    return env


def effective_wait_policy(wait_policy: str) -> str:
    """What the processes run with, for the settings: the forced value, or the inherited one."""
    if wait_policy != "inherit":
        return wait_policy.upper()
    return os.environ.get("OMP_WAIT_POLICY") or "unset (library default)"


def run_child(spec: dict[str, Any], env: dict[str, str], on_progress: Callable[[dict[str, Any]], None],
              cancelled: threading.Event) -> dict[str, Any]:
    """{"result": ...} or {"error": {kind, message, detail}}; raises ChildCancelled after killing it."""
    proc = subprocess.Popen([sys.executable, "-m", "runtimes.bench.child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
    assert proc.stdin and proc.stdout and proc.stderr
    proc.stdin.write((json.dumps(spec) + "\n").encode())
    proc.stdin.flush()
    lines: queue.Queue[bytes | None] = queue.Queue()
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def read_stdout() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            text = line.decode("utf-8", "replace").rstrip()
            tail.append(text)
            print(f"[bench {proc.pid}] {text}", file=sys.stderr, flush=True)

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    answer: dict[str, Any] | None = None
    try:
        while True:
            if cancelled.is_set():
                raise ChildCancelled()
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            message = json.loads(line)
            if "progress" in message:
                on_progress(message["progress"])
            else:
                answer = message
    finally:
        if proc.poll() is None and answer is None:
            proc.kill()
        proc.stdin.close()
        proc.wait()
        readers[1].join(timeout=5)
    if answer is None:
        return {"error": {"kind": "worker_crashed", "message": f"the measurement process for this model exited with code "
                          f"{proc.returncode} before answering (see stderr_tail)", "detail": {"exit_code": proc.returncode,
                                                                                         "stderr_tail": list(tail)}}}
    return answer
