"""One module per method; this table maps each method of the contract to its implementation.

Handlers for methods that run in the sidecar are `async def handle(params, ctx)`; those that run in
worker processes are plain `def run(params, ctx)`. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

IMPLEMENTATIONS: dict[str, str] = {
    "models/list": "handlers.models:list_models",
    "models/load": "handlers.models:load_model",
    "models/unload": "handlers.models:unload_model",
    "generate": "handlers.generate:generate",
    "embed": "handlers.embed:embed",
    "artifacts/list": "handlers.artifacts:list_artifacts",
    "artifacts/get": "handlers.artifacts:get_artifact",
    "train": "handlers.train:train",
    "datasets/inspect": "handlers.datasets:inspect",
    "merge_lora": "handlers.convert.merge_lora:merge_lora",
    "export": "handlers.convert.export:export",
    "quantize": "handlers.convert.quantize:quantize",
    "benchmark": "handlers.benchmark:benchmark",
    "debug/sleep": "handlers.debug:sleep",
    "debug/stream": "handlers.debug:stream",
    "debug/crash": "handlers.debug:crash",
    "debug/print": "handlers.debug:print_to_stdout",
}


def implementation(method: str) -> Callable[..., Any]:
    module_name, _, function = IMPLEMENTATIONS[method].partition(":")
    return getattr(importlib.import_module(module_name), function)
