"""Which runtime loads which model: by request, or chosen from what the files are."""

from __future__ import annotations

import importlib
from pathlib import Path

from runtimes.base import Runtime, UnsupportedModel

_RUNTIMES = {
    "transformers": "runtimes.hf.lm:TransformersRuntime",
    "llama.cpp": "runtimes.llama_cpp.lm:LlamaCppRuntime",
    "onnxruntime": "runtimes.onnx.runtime:OnnxRuntime",
}


def get_runtime(name: str) -> Runtime:
    spec = _RUNTIMES.get(name)
    if spec is None:
        raise UnsupportedModel(f"runtime {name!r} is not available in this build; available: {', '.join(sorted(_RUNTIMES))}",
                               runtime=name, available=sorted(_RUNTIMES))
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)()


def pick_runtime(path: Path, requested: str = "auto") -> Runtime:
    if requested not in ("auto", "any"):
        return get_runtime(requested)
    if (path.is_dir() and (path / "model.onnx").is_file()) or path.suffix == ".onnx":
        return get_runtime("onnxruntime")  # an ONNX export holds config.json too: the graph decides
    if path.is_dir() and (path / "config.json").exists():
        return get_runtime("transformers")
    if path.suffix == ".gguf":
        return get_runtime("llama.cpp")
    raise UnsupportedModel(
        f"{path} is neither a Hugging Face model directory (with config.json), a .gguf file nor an ONNX export "
        "(a directory holding model.onnx)",
        path=str(path),
    )
