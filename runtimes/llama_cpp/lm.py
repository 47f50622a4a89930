"""llama.cpp runtime through llama-cpp-python: GGUF files, with their own tokenizer, template and embeddings."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import ProgressFn, UnsupportedModel
from runtimes.text import Sampling, Utf8Stream


class _BytesDetokenizer:
    """llama.cpp gives each token's bytes; an incremental UTF-8 decoder keeps code points whole."""

    def __init__(self, llama: Any) -> None:
        self._llama = llama
        self._utf8 = Utf8Stream()

    def feed(self, token_id: int) -> str:
        return self._utf8.feed(self._llama.detokenize([token_id]))

    def flush(self) -> str:
        return self._utf8.flush()


@dataclass
class LlamaCppModel:
    llama: Any
    path: Path
    device: str
    memory_bytes: int
    embedding: bool
    dtype: str = "gguf"
    runtime: str = "llama.cpp"
    adapters: tuple[str, ...] = ()
    fixed_threads: int | None = None  # options.n_threads: used as given, never adapted
    _stop_ids: frozenset[int] | None = None

    @property
    def context_length(self) -> int:
        return int(self.llama.n_ctx())

    @property
    def chat_template(self) -> str | None:
        return self.llama.metadata.get("tokenizer.chat_template")

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        add_bos = not chat and self.llama.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def render_chat(self, messages: list[dict[str, str]], template: str | None, add_generation_prompt: bool) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from runtimes.hf.text_face import NoChatTemplate

        template = template or self.chat_template
        if not template:
            raise NoChatTemplate(self.path)
        vocab = self.llama
        formatter = Jinja2ChatFormatter(
            template,
            eos_token=vocab.detokenize([vocab.token_eos()], special=True).decode("utf-8", "replace"),
            bos_token=vocab.detokenize([vocab.token_bos()], special=True).decode("utf-8", "replace"),
            add_generation_prompt=add_generation_prompt,
        )
        return formatter(messages=messages).prompt

    def stop_ids(self) -> set[int]:
        """End-of-generation tokens, found once per loaded model (a scan of the vocabulary costs ~20-30 ms)."""
        if self._stop_ids is None:
            import llama_cpp

            vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
            self._stop_ids = frozenset(t for t in range(self.llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))
        return set(self._stop_ids)

    def detokenizer(self) -> _BytesDetokenizer:
        return _BytesDetokenizer(self.llama)

    def stream(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int, adapters: list, cancelled: threading.Event | None) -> Iterator[int]:
        if adapters:
            raise UnsupportedModel("llama.cpp applies a GGUF LoRA adapter at load time: pass options.lora_path instead of adapters")
        self.llama.set_seed(sampling.seed)
        temp = 0.0 if sampling.greedy else sampling.temperature
        tokens = self.llama.generate(prompt_ids, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                                     temp=temp, repeat_penalty=sampling.repeat_penalty, reset=True)
        try:
            for count, token in enumerate(tokens, start=1):
                yield int(token)
                if count >= max_tokens or (cancelled is not None and cancelled.is_set()):
                    return  # before the generator evaluates a token nobody will read
        finally:
            tokens.close()

    def embed(self, texts: list[str], *, pooling: str | None, normalize: bool, truncate: bool, batch_size: int,
              cancelled: threading.Event | None) -> tuple[Any, int, str]:
        """Pooling was fixed when the model was loaded in embedding mode (see handlers/embed.py)."""
        import llama_cpp
        import numpy as np

        if not self.embedding:
            raise UnsupportedModel("this llama.cpp model was loaded without embedding mode")
        vectors, count = [], 0
        for start in range(0, len(texts), batch_size):
            if cancelled is not None and cancelled.is_set():
                from protocol.errors import Cancelled

                raise Cancelled({"done": start})
            chunk, tokens = self.llama.embed(texts[start:start + batch_size], normalize=normalize, truncate=truncate,
                                             return_count=True)
            vectors += chunk
            count += tokens
        names = {llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean", llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
                 llama_cpp.LLAMA_POOLING_TYPE_LAST: "last"}
        used = names.get(llama_cpp.llama_pooling_type(self.llama._ctx.ctx), pooling or "model default")
        return np.asarray(vectors, dtype=np.float32), int(count), used

    def set_threads(self, count: int) -> None:
        """Threads for the next decode and prompt batch; llama.cpp reads them at every graph compute."""
        import llama_cpp

        if self.device == "cpu":
            llama_cpp.llama_set_n_threads(self.llama._ctx.ctx, count, count)

    def close(self) -> None:
        llama, self.llama = self.llama, None
        if llama is not None:
            llama.close()


DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class GgufHeader:
    context_length: int | None
    pooling_type: int | None  # set by embedding models; absent for causal LMs


def read_header(path: Path) -> GgufHeader:
    """What loading needs to know first, read from the GGUF header without loading the model."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""

    def number(key: str) -> int | None:
        field = reader.fields.get(f"{arch}.{key}")
        return int(field.parts[field.data[0]][0]) if field is not None else None

    return GgufHeader(number("context_length"), number("pooling_type"))


class LlamaCppRuntime:
    name = "llama.cpp"

    def can_load(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def estimate_bytes(self, path: Path, options: dict[str, Any]) -> int:
        return path.stat().st_size

    def load(self, path: Path, options: dict[str, Any], progress: ProgressFn) -> LlamaCppModel:
        if not self.can_load(path):
            raise UnsupportedModel(f"{path} is not a .gguf file", path=str(path))
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UnsupportedModel(f"{path} is not a GGUF file (bad magic)", path=str(path))
        progress(0, 2, "importing llama.cpp")
        import llama_cpp

        n_gpu_layers = options.get("n_gpu_layers")
        device = options.get("device") or "auto"
        if n_gpu_layers is None:
            n_gpu_layers = -1 if device != "cpu" and llama_cpp.llama_supports_gpu_offload() else 0
        lora = options.get("lora")
        try:
            header = read_header(path)
        except Exception as exc:  # noqa: BLE001 - any header the reader cannot parse is a broken file
            raise UnsupportedModel(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); re-export it",
                                   path=str(path)) from None
        n_ctx = options.get("n_ctx") or min(header.context_length or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
        pooling = options.get("pooling_type", -1)
        if options.get("embedding") and pooling == -1 and header.pooling_type is None:
            pooling = llama_cpp.LLAMA_POOLING_TYPE_MEAN  # a causal LM has no pooling of its own: masked mean, as on torch
        progress(1, 2, f"loading {path.name}")
        try:
            llama = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_threads=_threads(options), n_threads_batch=_threads(options),
                n_gpu_layers=n_gpu_layers, embedding=bool(options.get("embedding")), verbose=False,
                lora_path=lora[0] if lora else None, lora_scale=lora[1] if lora else 1.0,
                pooling_type=pooling,
            )
        except ValueError as exc:
            raise UnsupportedModel(f"llama.cpp could not load {path}: {exc}", path=str(path)) from None
        progress(2, 2, "loaded")
        on_gpu = n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        return LlamaCppModel(llama, path, "gpu" if on_gpu else "cpu", path.stat().st_size, bool(options.get("embedding")),
                             adapters=(lora[0],) if lora else (), fixed_threads=options.get("n_threads") or None)


def _threads(options: dict[str, Any]) -> int:
    """The request's n_threads, else the sidecar's thread policy (MLSIDECAR_THREADS), else every CPU."""
    return int(options.get("n_threads") or os.environ.get("MLSIDECAR_THREADS") or os.cpu_count() or 1)
