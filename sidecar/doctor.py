"""`python -m sidecar doctor`: what is installed, which devices torch sees, where data lives."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

from sidecar.about import package_version
from sidecar.config import Config

PACKAGES = ["mlsidecar", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf",
            "llama_cpp_python", "coremltools", "msgspec", "orjson", "anyio"]


def torch_devices() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return {"error": f"torch does not import: {exc}"}
    devices: dict[str, Any] = {"cpu": {"threads": torch.get_num_threads()}}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices[f"cuda:{index}"] = {"name": props.name, "memory_bytes": props.total_memory}
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices["mps"] = {}
    devices["import_s"] = round(time.perf_counter() - started, 2)
    return devices


def llama_cpp_info() -> dict[str, Any]:
    try:
        import llama_cpp

        return {"version": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


def _roots(config: Config) -> tuple:
    from pathlib import Path

    from sidecar.paths import PathPolicy, default_roots

    return PathPolicy(default_roots(config.home, Path.cwd(), os.environ, config.extra_roots)).roots


def report() -> dict[str, Any]:
    config = Config.from_env()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "devices": torch_devices(),
        "llama_cpp": llama_cpp_info(),
        "home": str(config.home),
        "allowed_roots_env": os.environ.get("MLSIDECAR_ALLOWED_ROOTS", ""),
        "allowed_roots": [str(r) for r in _roots(config)],
        "threads": __import__("sidecar.threads", fromlist=["current"]).current().to_dict(),
        "pool_budget_bytes": config.pool_budget_bytes,
        "allow_network": config.allow_network,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar doctor", description="Report versions, devices and paths.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = report()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"python      {data['python']}  ({data['platform']})")
    for name, version in data["packages"].items():
        print(f"  {name:<18} {version or 'not installed'}")
    print("devices     " + ", ".join(k for k in data["devices"] if k != "import_s"))
    print(f"llama.cpp   {data['llama_cpp']}")
    print(f"home        {data['home']}")
    print("roots       " + "\n            ".join(data["allowed_roots"]) + "   (add more with --allow-root DIR or MLSIDECAR_ALLOWED_ROOTS)")
    print(f"pool budget {data['pool_budget_bytes'] / 2**30:.1f} GiB")
    print(f"threads     {data['threads']['threads']} per job, OMP_WAIT_POLICY={data['threads']['wait_policy']} "
          f"({data['threads']['reason']}; override with --threads / MLSIDECAR_THREADS, MLSIDECAR_THREADS_ADAPT=0, MLSIDECAR_WAIT_POLICY)")
    print(f"network     {'allowed' if data['allow_network'] else 'off (offline first)'}")
    missing = [n for n, v in data["packages"].items() if v is None and n != "mlsidecar"]
    if missing:
        print("missing: " + ", ".join(missing) + " (pip install -e . installs them)")
    return 0
