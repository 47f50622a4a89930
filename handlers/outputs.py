"""Where a long job's artifact goes: an `output` path inside the roots, or a plain `name` under the home.

Every method that writes an artifact resolves its destination here, before any work, so a taken
output or a name that tries to leave the artifacts directory is refused at once and in one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.errors import RpcError


def check_name(name: str, field: str = "params.name") -> str:
    """A name is one path component: no separators, no '..', nothing hidden, nothing empty."""
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise RpcError.invalid_params(field, f"{name!r} is not a plain name: use letters, digits, '-', '_' or '.', "
                                             "without separators or '..' (give `output` for a path)")
    if len(name.encode()) > 200:
        raise RpcError.invalid_params(field, "must be at most 200 bytes")
    return name


def destination(services: Any, folder: str, *, output: str | None, name: str | None, default_name: str,
                output_field: str = "params.output", name_field: str = "params.name") -> tuple[str, Path]:
    """(name, absolute destination) for an artifact; raises before anything is written.

    `output` is checked against the roots (path_not_allowed); otherwise the artifact goes to
    <home>/artifacts/<folder>/<name>. A destination that exists is `artifact_exists`.
    """
    if name is not None:
        check_name(name, name_field)
    if output:
        dest = services.paths.check(Path(output).expanduser())
        name = name or dest.name
    else:
        name = name or default_name
        dest = services.config.home / "artifacts" / folder / name
    if dest.exists() or dest.is_symlink():
        raise RpcError.failed("artifact_exists", f"{dest} already exists; choose another output (or name), or remove it first",
                              path=str(dest))
    return name, dest
