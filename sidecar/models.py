"""Model references: what a request may name, and how each resolves to files on this machine.

A reference is `builtin:NAME`, a registry artifact id (optionally `artifact:ID`), a local directory
or file inside the allowed roots, or a Hugging Face id found in the local cache (downloaded only
when the host allows network). What cannot be resolved fails with kind `model_not_found` and the
list of what was tried.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import Config
from sidecar.paths import PathPolicy

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTINS = ("tiny",)


class ModelNotFound(Exception):
    error_kind = "model_not_found"

    def __init__(self, reference: str, tried: list[str]) -> None:
        super().__init__(f"model {reference!r} not found; tried: " + "; ".join(tried))
        self.error_detail = {"model": reference, "tried": tried}


@dataclass(frozen=True)
class ResolvedModel:
    reference: str
    path: Path
    source: str  # builtin | artifact | local | hf-cache
    artifact_id: str | None = None


def _model_file(artifact_dir: Path) -> Path:
    """A single-file model artifact (a GGUF export) resolves to the file its manifest names, so that
    generate, models/load and benchmark take the artifact id; a model directory resolves to itself."""
    try:
        named = json.loads((artifact_dir / "manifest.json").read_text()).get("model_file")
    except (OSError, ValueError, AttributeError):
        return artifact_dir
    if isinstance(named, str) and "/" not in named and (artifact_dir / named).is_file():
        return artifact_dir / named
    return artifact_dir


class ModelResolver:
    def __init__(self, config: Config, paths: PathPolicy, registry: Callable[[], Any]) -> None:
        self.config = config
        self.paths = paths
        self._registry = registry

    def resolve(self, reference: str, progress: Callable[[int, int, str], None] | None = None) -> ResolvedModel:
        """May take seconds (building a builtin, reading the HF cache): call it off the event loop."""
        reference = reference.strip()
        if reference.startswith("builtin:"):
            return self._builtin(reference, progress)
        tried: list[str] = []
        artifact_id = reference.removeprefix("artifact:")
        from sidecar.registry import RegistryUnavailable

        try:
            record = self._registry().get_artifact(artifact_id)
        except RegistryUnavailable as exc:
            if reference.startswith("artifact:"):
                raise
            record = None  # a path or an HF id still resolves without the registry
            tried.append(f"registry: unavailable ({exc})")
        else:
            tried.append(f"registry: no artifact with id {artifact_id!r}")
        if record is not None:
            return ResolvedModel(reference, _model_file(Path(record.path)), "artifact", record.id)
        if reference.startswith("artifact:"):
            raise ModelNotFound(reference, tried)
        local = Path(os.path.expanduser(reference))
        # Containment before existence, for every reference: whether a path outside the roots exists
        # must never change the answer (an HF id such as org/name lies inside the working directory).
        checked = self.paths.check(local)
        if checked.exists():
            return ResolvedModel(reference, checked, "local")
        tried.append(f"local path: {local.absolute()} does not exist")
        if _HF_ID.match(reference):
            found = self._hf_cache(reference, tried)
            if found is not None:
                return ResolvedModel(reference, found, "hf-cache")
        else:
            tried.append("Hugging Face: not an 'org/name' id")
        raise ModelNotFound(reference, tried)

    def _builtin(self, reference: str, progress: Callable[[int, int, str], None] | None) -> ResolvedModel:
        name = reference.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ModelNotFound(reference, [f"builtin: unknown name {name!r}; builtins are " + ", ".join(f"builtin:{b}" for b in BUILTINS)])
        from runtimes.tiny import TINY_VERSION, build_tiny_model

        dest = self.config.home / "models" / "builtin" / TINY_VERSION
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            registry = self._registry()
            try:
                with registry.write_artifact("model", dest, name=reference, params={"recipe": TINY_VERSION}) as pending:
                    pending.metrics = build_tiny_model(pending.path, progress)
            except (FileExistsError, OSError):
                if not (dest / "config.json").exists():  # not a lost race with another process: a real failure
                    raise
        return ResolvedModel(reference, dest, "builtin")

    def _hf_cache(self, repo_id: str, tried: list[str]) -> Path | None:
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError:
            tried.append("Hugging Face cache: huggingface_hub is not installed")
            return None
        offline = not self.config.allow_network
        try:
            return Path(snapshot_download(repo_id, local_files_only=offline))
        except LocalEntryNotFoundError:
            hint = " (network downloads are off: start with --allow-network or send capabilities.allowNetwork)" if offline else ""
            tried.append(f"Hugging Face cache: {repo_id!r} is not cached{hint}")
        except Exception as exc:  # noqa: BLE001 - any hub failure is one more thing tried
            tried.append(f"Hugging Face: {type(exc).__name__}: {exc}")
        return None
