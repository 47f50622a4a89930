"""Writing a file so that nobody ever sees half of it: a hidden temporary sibling, fsync, rename.

The temporary is named `.NAME.tmp-*`, the pattern the sidecar's start-up sweep removes, so even a
writer killed mid-file leaves nothing a reader could mistake for a result.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temp_sibling(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{secrets.token_hex(4)}")


@contextmanager
def atomic_file(dest: Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a file open for writing; on success it replaces dest whole, on any failure it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(dest)
    try:
        with open(temp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, dest)
    except OSError as exc:
        full = exc.errno is None and _out_of_space(temp)  # numpy: "96000 requested and 16352 written", no errno
        temp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on the device writing {dest}", str(dest)) from exc
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _out_of_space(path: Path) -> bool:
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)  # under a MiB left: the short write was the disk filling
