"""Notice that the host process died, so the sidecar never outlives the app that spawned it."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def arm_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` when the parent dies (PR_SET_PDEATHSIG); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def watch_host(original_ppid: int, host_pid: Callable[[], int | None], on_gone: Callable[[str], None],
                     interval_s: float = 0.25) -> None:
    """Poll the parent pid (reparenting means the parent died) and the host's processId."""
    while True:
        await asyncio.sleep(interval_s)
        if os.getppid() != original_ppid:
            on_gone(f"parent process {original_ppid} exited")
            return
        pid = host_pid()
        if pid is not None and not pid_alive(pid):
            on_gone(f"host process {pid} exited")
            return


def parent_death_signal() -> int:
    """SIGUSR2 rather than SIGTERM: PR_SET_PDEATHSIG also fires when the spawning *thread* exits,
    so the handler checks that the parent really changed before shutting down."""
    return int(signal.SIGUSR2)
