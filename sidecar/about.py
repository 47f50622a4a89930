"""What the sidecar tells a host about itself, computed without importing heavy libraries."""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata

from protocol import messages as m
from protocol.methods import METHODS
from sidecar.config import Config

_NO_CANCEL = {"initialize", "ping", "status", "shutdown", "models/list", "artifacts/list", "artifacts/get"}


@functools.cache
def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def server_info() -> m.ServerInfo:
    return m.ServerInfo(
        name="mlsidecar",
        version=package_version("mlsidecar") or "0+unknown",
        pid=os.getpid(),
        python=platform.python_version(),
        torch=package_version("torch"),
        llama_cpp=package_version("llama_cpp_python"),
        coremltools=package_version("coremltools"),
    )


def probable_devices() -> list[str]:
    """Devices a cheap look can promise; `doctor` asks torch itself (which takes seconds to import)."""
    devices = ["cpu"]
    torch_version = package_version("torch") or ""
    if os.path.exists("/dev/nvidiactl") and "+cpu" not in torch_version:
        devices.append("cuda")
    if sys.platform == "darwin" and platform.machine() == "arm64":
        devices.append("mps")
    return devices


def capabilities(config: Config) -> m.ServerCapabilities:
    methods = {
        name: m.MethodInfo(contract.runs_in, name not in _NO_CANCEL)
        for name, contract in METHODS.items()
        if config.debug or not contract.debug
    }
    return m.ServerCapabilities(methods, probable_devices(), config.max_message_bytes, config.max_concurrent_jobs, config.max_queued_jobs)
