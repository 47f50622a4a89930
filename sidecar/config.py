"""Configuration from command-line flags and MLSIDECAR_* environment variables (flags win)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


def default_home() -> Path:
    """The platform's user data directory, as platformdirs would choose it, without the dependency."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "mlsidecar"


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_bytes(text: str) -> int:
    """'8GiB', '512MB', '1.5G' or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    if cleaned and cleaned[-1] in units:
        return int(float(cleaned[:-1]) * units[cleaned[-1]])
    return int(float(cleaned))


def _env_flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Config:
    home: Path = field(default_factory=default_home)
    extra_roots: list[str] = field(default_factory=list)
    debug: bool = False
    strict: bool = False
    allow_network: bool = False
    max_message_bytes: int = 16 << 20
    max_concurrent_jobs: int = 1
    max_queued_jobs: int = 32
    pool_budget_bytes: int = field(default_factory=lambda: physical_memory_bytes() // 2)
    cancel_grace_s: float = 10.0
    host_pid: int | None = None
    spare_worker: bool = True  # keep one worker process started for the next job (MLSIDECAR_SPARE_WORKER=0: none)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Config":
        env = dict(os.environ if env is None else env)
        config = cls()
        if env.get("MLSIDECAR_HOME"):
            config.home = Path(env["MLSIDECAR_HOME"]).expanduser()
        config.debug = _env_flag(env, "MLSIDECAR_DEBUG")
        config.allow_network = _env_flag(env, "MLSIDECAR_ALLOW_NETWORK")
        if env.get("MLSIDECAR_MAX_CONCURRENT_JOBS"):
            config.max_concurrent_jobs = int(env["MLSIDECAR_MAX_CONCURRENT_JOBS"])
        if env.get("MLSIDECAR_MAX_QUEUED_JOBS"):
            config.max_queued_jobs = int(env["MLSIDECAR_MAX_QUEUED_JOBS"])
        if env.get("MLSIDECAR_MAX_MESSAGE_BYTES"):
            config.max_message_bytes = parse_bytes(env["MLSIDECAR_MAX_MESSAGE_BYTES"])
        if env.get("MLSIDECAR_SPARE_WORKER") is not None:
            config.spare_worker = _env_flag(env, "MLSIDECAR_SPARE_WORKER")
        if env.get("MLSIDECAR_POOL_BUDGET"):
            config.pool_budget_bytes = parse_bytes(env["MLSIDECAR_POOL_BUDGET"])
        return config

    def to_worker(self) -> dict:
        """What a worker process needs to rebuild the same view of the world."""
        return {"home": str(self.home), "extra_roots": self.extra_roots, "debug": self.debug, "allow_network": self.allow_network,
                "max_message_bytes": self.max_message_bytes}
