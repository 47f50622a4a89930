"""Unmerged LoRA adapters on a pooled base model, switched per request without reloading the base.

Adapters are loaded once into the base model's LoRA layers (peft) and kept. A request activates its
set: one or several adapters at once, each with its own weight (the layer's scale), so the output is
base + sum(weight_i * delta_i) exactly, with no merged copy of the weights. No adapters: all disabled.
Requests on one model are serialized by the pool, so switching never races a running forward.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel


class AdapterError(UnsupportedModel):
    error_kind = "adapter_invalid"


def adapter_name(path: Path) -> str:
    return "a" + hashlib.sha1(str(path).encode()).hexdigest()[:12]


class AdapterManager:
    def __init__(self, model: Any) -> None:
        self._model = model
        self._peft: Any = None
        self.loaded: dict[str, Path] = {}

    def _load(self, path: Path) -> str:
        name = adapter_name(path)
        if name in self.loaded:
            return name
        if not (path / "adapter_config.json").exists():
            raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)", path=str(path))
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise AdapterError(f"adapter {path} does not fit this base model: {exc}", path=str(path)) from None
        self._peft.eval()
        self.loaded[name] = path
        return name

    @contextlib.contextmanager
    def activated(self, adapters: Sequence[tuple[Path, float]]) -> Iterator[None]:
        """Activate exactly `adapters` for the duration of one request."""
        if not adapters:
            if self._peft is None:
                yield
            else:
                with self._peft.disable_adapter():
                    yield
            return
        names = [self._load(path) for path, _ in adapters]
        tuner = self._peft.base_model
        tuner.set_adapter(names)
        self._set_scales(dict(zip(names, (w for _, w in adapters))))
        try:
            yield
        finally:
            self._set_scales({name: 1.0 for name in names})

    def _set_scales(self, scales: dict[str, float]) -> None:
        from peft.tuners.lora.layer import LoraLayer

        for module in self._peft.modules():
            if isinstance(module, LoraLayer):
                for name, scale in scales.items():
                    module.set_scale(name, scale)
