"""transformers/torch runtime: Hugging Face directories, safetensors only unless pickle is allowed."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import ProgressFn, UnsupportedModel
from runtimes.hf.text_face import HfTextFace

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
class TransformersModel(HfTextFace):
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    path: Path
    device: str
    dtype: str
    memory_bytes: int
    is_causal_lm: bool
    runtime: str = "transformers"
    fixed_threads: int | None = None  # options.n_threads: used as given, never adapted
    _adapters: Any = None

    @property
    def adapters(self) -> list[str]:
        return [str(p) for p in self._adapters.loaded.values()] if self._adapters else []

    def stop_ids(self) -> set[int]:
        return self.eos_ids(getattr(getattr(self.model, "generation_config", None), "eos_token_id", None))

    def stream(self, prompt_ids: list[int], sampling: Any, max_tokens: int, adapters: list[tuple[Path, float]],
               cancelled: Any) -> Any:
        from runtimes.hf.adapters import AdapterManager
        from runtimes.hf.generate import stream_token_ids

        if adapters and self._adapters is None:
            self._adapters = AdapterManager(self.model)
        manager = self._adapters
        if manager is None:
            yield from stream_token_ids(self.model, prompt_ids, sampling, max_tokens, self.device, cancelled)
            return
        with manager.activated(adapters):
            yield from stream_token_ids(self.model, prompt_ids, sampling, max_tokens, self.device, cancelled)

    def embed(self, texts: list[str], *, pooling: str | None, normalize: bool, truncate: bool, batch_size: int,
              cancelled: Any) -> tuple[Any, int, str]:
        """(float32 vectors, real tokens, pooling used); pooling defaults to the model's own configuration."""
        from runtimes.hf.embeddings import EmptyInput, InputTooLong, default_pooling, embed_texts

        chosen = pooling or default_pooling(self.path, self.is_causal_lm)
        try:
            vectors, tokens = embed_texts(self.model, self.tokenizer, texts, pooling=chosen, normalize=normalize,
                                          truncate=truncate, batch_size=batch_size, device=self.device, cancelled=cancelled)
        except InputTooLong as exc:
            raise TextTooLong(str(exc) + "; shorten it or pass truncate: true", index=exc.index, tokens=exc.tokens,
                              max_length=exc.max_length) from None
        except EmptyInput as exc:
            raise TextEmpty(f"text {exc.index} has no tokens for this model's tokenizer; drop it or add some text",
                            index=exc.index) from None
        return vectors, tokens, chosen

    def set_threads(self, count: int) -> None:
        """torch's intra-op pool for the calling thread (the model's engine thread, which computes)."""
        import torch

        if self.device == "cpu" and torch.get_num_threads() != count:
            torch.set_num_threads(count)

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


class TextTooLong(UnsupportedModel):
    error_kind = "input_too_long"


class TextEmpty(UnsupportedModel):
    error_kind = "input_empty"


def check_model_dir(path: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """The checks every method makes before loading a Hugging Face directory (generate, train, merge,
    export), so each refuses the same inputs with the same words; returns the parsed config.json."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UnsupportedModel(f"{path} is not a Hugging Face model directory (no config.json)", path=str(path))
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedModel(f"{path / 'config.json'} is not valid JSON ({exc})", path=str(path)) from None
    if any(path.glob("*.safetensors")):
        return config
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickled:
        raise UnsupportedModel(f"{path} has no model weights (*.safetensors)", path=str(path))
    if not allow_pickle:
        raise UnsupportedModel(
            f"{path} has only pickle weights ({', '.join(pickled[:3])}); loading them can run code: pass "
            "options.allow_pickle=true, and only for a source you trust",
            path=str(path), files=pickled, hint="options.allow_pickle",
        )
    return config


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
        allow_pickle = bool(options.get("allow_pickle"))
        config = check_model_dir(path, allow_pickle)
        progress(0, 3, "importing torch and transformers")
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()  # stderr is for logs, not bars

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
        return TransformersModel(model, tokenizer, config, path, device, dtype, memory, is_causal_lm,
                                 fixed_threads=options.get("n_threads") or None)
