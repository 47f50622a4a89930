"""transformers/torch runtime: Hugging Face directories, safetensors only unless pickle is allowed."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import ProgressFn, UnsupportedModel

_DTYPES = {"float32", "float16", "bfloat16"}


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str, config: dict[str, Any]) -> str:
    if requested != "auto":
        return requested
    if device == "cpu":
        return "float32"
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return stored if stored in _DTYPES else "float16"


@dataclass
class TransformersModel:
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    path: Path
    device: str
    dtype: str
    memory_bytes: int
    is_causal_lm: bool
    runtime: str = "transformers"
    adapters: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        gc.collect()
        try:
            import torch

            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            elif self.device == "mps":
                torch.mps.empty_cache()
        except Exception:  # noqa: BLE001 - freeing is best effort; the references are gone already
            pass


class TransformersRuntime:
    name = "transformers"

    def can_load(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").exists()

    def estimate_bytes(self, path: Path, options: dict[str, Any]) -> int:
        weights = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        size = sum(f.stat().st_size for f in weights)
        dtype = options.get("dtype") or "auto"
        return size // 2 if dtype in ("float16", "bfloat16") and size else size

    def load(self, path: Path, options: dict[str, Any], progress: ProgressFn) -> TransformersModel:
        config = json.loads((path / "config.json").read_text())
        allow_pickle = bool(options.get("allow_pickle"))
        if not allow_pickle and not list(path.glob("*.safetensors")):
            raise UnsupportedModel(
                f"{path} has no .safetensors weights; pickle checkpoints (.bin) load only with options.allow_pickle=true, "
                "and only from a source you trust",
                path=str(path),
            )
        progress(0, 3, "importing torch and transformers")
        import torch
        import transformers

        device = pick_device(options.get("device") or "auto")
        dtype = pick_dtype(options.get("dtype") or "auto", device, config)
        architectures = config.get("architectures") or []
        is_causal_lm = any(a.endswith("ForCausalLM") for a in architectures)
        auto = transformers.AutoModelForCausalLM if is_causal_lm else transformers.AutoModel
        trust = bool(options.get("trust_remote_code"))
        progress(1, 3, f"loading weights ({dtype}) on {device}")
        model = auto.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=not allow_pickle or None,
                                     trust_remote_code=trust, local_files_only=True)
        model.to(device)
        model.eval()
        progress(2, 3, "loading tokenizer")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust, local_files_only=True)
        memory = sum(t.numel() * t.element_size() for t in model.parameters())
        memory += sum(t.numel() * t.element_size() for t in model.buffers())
        progress(3, 3, "loaded")
        return TransformersModel(model, tokenizer, config, path, device, dtype, memory, is_causal_lm)
