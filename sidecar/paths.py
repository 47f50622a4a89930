"""File paths limited to configured roots.

A request names files (datasets, models, output folders) that the sidecar reads or writes on the
host's behalf. The host decides which directories that may touch; everything else is refused with a
message that says how to widen the set, so a bad or hostile request cannot read ~/.ssh or write
over /etc.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

ENV_ALLOWED_ROOTS = "MLSIDECAR_ALLOWED_ROOTS"

__all__ = ["ENV_ALLOWED_ROOTS", "PathNotAllowed", "PathPolicy", "default_roots"]


class PathNotAllowed(Exception):
    """A path outside every allowed root; maps to the protocol's path_not_allowed failure."""

    error_kind = "path_not_allowed"

    def __init__(self, path: str | os.PathLike, roots: Iterable[str | os.PathLike], reason: str = "") -> None:
        self.path = os.fspath(path)
        self.roots = [os.fspath(r) for r in roots]
        self.reason = reason or "it is outside the allowed roots"
        shown = ", ".join(self.roots) if self.roots else "(none configured)"
        super().__init__(
            f"path {self.path!r} is not allowed: {self.reason}. Allowed roots: {shown}. "
            f"To allow another directory, pass --allow-root DIR or set {ENV_ALLOWED_ROOTS} "
            f"(several directories separated by {os.pathsep!r})."
        )
        self.error_detail = {"path": self.path, "roots": self.roots}


class PathPolicy:
    """Resolves request paths and refuses those outside the roots.

    The check resolves symlinks, so it cannot be fooled by a link planted inside a root. It does not
    stop a symlink being swapped in after the check (TOCTOU); the roots are the host's own
    directories, so that attacker would already have the user's rights.
    """

    def __init__(self, roots: Iterable[str | os.PathLike]) -> None:
        seen: dict[Path, None] = {}
        for root in roots:
            seen.setdefault(Path(os.path.realpath(Path(root).expanduser())), None)
        self.roots: tuple[Path, ...] = tuple(seen)

    def __repr__(self) -> str:
        return f"PathPolicy({[str(r) for r in self.roots]!r})"

    def allows(self, path: str | os.PathLike) -> bool:
        """True when check() would accept the path (existence aside)."""
        try:
            self.check(path)
        except PathNotAllowed:
            return False
        return True

    def check(self, path: str | os.PathLike, *, must_exist: bool = False) -> Path:
        """Return the resolved absolute path if it lies under a root, else raise PathNotAllowed.

        Outputs often do not exist yet: the deepest existing ancestor is resolved (symlinks
        included) and the rest appended, with '..' there refused because it cannot be resolved
        safely. Containment is checked before existence so a refused path reveals nothing.
        """
        given = os.fspath(path)
        if not given:
            raise PathNotAllowed(given, self._shown_roots(), "the path is empty")
        if "\0" in given:
            raise PathNotAllowed(given, self._shown_roots(), "the path contains a NUL byte")
        absolute = Path(given).expanduser()
        if not absolute.is_absolute():
            absolute = Path.cwd() / absolute

        existing, remainder = absolute, []
        while not os.path.lexists(existing) and existing.parent != existing:
            remainder.append(existing.name)
            existing = existing.parent
        if ".." in remainder:
            raise PathNotAllowed(given, self._shown_roots(), "'..' follows a directory that does not exist")
        # realpath also follows a dangling symlink, so a link to a not-yet-existing file outside is refused.
        resolved = Path(os.path.realpath(existing)).joinpath(*reversed(remainder))

        if not any(resolved.is_relative_to(root) for root in self.roots):
            reason = "it is outside the allowed roots"
            lexical = Path(os.path.normpath(absolute))
            if any(lexical.is_relative_to(root) for root in self.roots):
                reason = f"it resolves through a symlink to {str(resolved)!r}, outside the allowed roots"
            raise PathNotAllowed(given, self._shown_roots(), reason)
        if must_exist and not resolved.exists():
            raise FileNotFoundError(
                errno.ENOENT, f"{given!r} does not exist (resolved to {str(resolved)!r}); check the path", given
            )
        return resolved

    def _shown_roots(self) -> list[str]:
        return [str(r) for r in self.roots]


def default_roots(
    home: Path, cwd: Path, env: Mapping[str, str], extra: Iterable[str | os.PathLike]
) -> list[Path]:
    """The roots a sidecar starts with: its home, its working directory, the environment's, then --allow-root.

    Relative entries are taken against cwd (not the process's current directory) so the result
    depends only on the arguments.
    """
    def absolute(entry: str | os.PathLike) -> Path:
        p = Path(entry).expanduser()
        return p if p.is_absolute() else Path(cwd) / p

    roots = [Path(home), Path(cwd)]
    roots += [absolute(e) for e in env.get(ENV_ALLOWED_ROOTS, "").split(os.pathsep) if e.strip()]
    roots += [absolute(e) for e in extra if os.fspath(e)]
    return roots
