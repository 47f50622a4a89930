"""The two engines as the benchmark drives them: the few primitives every measurement is built from.

Each engine offers the same face, so speed, perplexity and parity are computed by one piece of code
for every runtime: `prompt(ids)` (one pass over a prompt, in batches of n_batch, logits for the last
token only, as llama-bench's test_prompt), `step(id)` (one token decoded on the cache),
`clear()` (empty the cache), `logits(ids, first)` (a fresh pass with the logits of positions first..),
`greedy(ids, n)`, `tokenize(text)` and `embed(texts)`; plus `n_vocab`, `add_bos`, `bos`.

llama.cpp is driven through llama-cpp-python's low-level API, not `Llama`, to set up the context
exactly as llama-bench does (llama_context_default_params: flash attention auto, f16 KV cache; n_ctx
= the test's length, its n_batch and n_ubatch, the same threads for prompt and generation) and to
decode with llama_batch_get_one (output for the last token only).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel


class LlamaCppEngine:
    runtime = "llama.cpp"

    def __init__(self, path: Path, *, threads: int, batch_size: int, ubatch_size: int, device: str = "auto") -> None:
        import llama_cpp
        from llama_cpp import _internals

        from runtimes.llama_cpp.lm import LlamaCppRuntime

        if not LlamaCppRuntime().can_load(path):
            raise UnsupportedModel(f"{path} is not a .gguf file", path=str(path))
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UnsupportedModel(f"{path} is not a GGUF file (bad magic)", path=str(path))
        self._ll, self._internals = llama_cpp, _internals
        self.path, self.threads, self.batch_size, self.ubatch_size = path, threads, batch_size, ubatch_size
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        offload = device != "cpu" and llama_cpp.llama_supports_gpu_offload()
        params.n_gpu_layers = -1 if offload else 0
        self.device = "gpu" if offload else "cpu"
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as exc:
            raise UnsupportedModel(f"llama.cpp could not load {path}: {exc}", path=str(path)) from None
        vocab = self.model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.context_length = int(self.model.n_ctx_train())
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model.model, desc, 256)
        self.dtype = desc.value.decode("utf-8", "replace")
        self._ctx: Any = None
        self._n_ctx = 0
        self._token = (llama_cpp.llama_token * 1)()

    # ----- contexts

    def use_context(self, n_ctx: int) -> None:
        """A fresh context of n_ctx cells, as llama-bench makes one per test."""
        ll = self._ll
        self.close_context()
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.batch_size
        params.n_ubatch = self.ubatch_size
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self._ctx = self._internals.LlamaContext(model=self.model, params=params, verbose=False)
        self._n_ctx = n_ctx

    def _context_for(self, n_tokens: int) -> Any:
        if self._ctx is None or self._n_ctx < n_tokens:
            self.use_context(n_tokens)
        return self._ctx.ctx

    def close_context(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    # ----- the primitives

    def clear(self) -> None:
        ll = self._ll
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx.ctx), False)

    def prompt(self, ids: Sequence[int]) -> None:
        ll, ctx = self._ll, self._ctx.ctx
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            array = (ll.llama_token * len(chunk))(*chunk)
            if ll.llama_decode(ctx, ll.llama_batch_get_one(array, len(chunk))) != 0:
                raise RuntimeError("llama_decode failed on a prompt batch")
        ll.llama_synchronize(ctx)

    def step(self, token: int) -> None:
        ll, ctx = self._ll, self._ctx.ctx
        self._token[0] = token
        if ll.llama_decode(ctx, ll.llama_batch_get_one(self._token, 1)) != 0:
            raise RuntimeError("llama_decode failed on a generation step")
        ll.llama_synchronize(ctx)

    def last_argmax(self) -> int:
        import numpy as np

        row = self._ll.llama_get_logits_ith(self._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))

    def logits(self, ids: Sequence[int], first: int) -> Any:
        """float32 logits (len(ids) - first, n_vocab) of a fresh pass over ids."""
        import numpy as np

        ll = self._ll
        ctx = self._context_for(len(ids))
        self.clear()
        batch = ll.llama_batch_init(self.batch_size, 0, 1)
        rows = []
        try:
            for start in range(0, len(ids), self.batch_size):
                chunk = ids[start:start + self.batch_size]
                outputs = 0
                for k, token in enumerate(chunk):
                    batch.token[k] = token
                    batch.pos[k] = start + k
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = 0
                    wanted = start + k >= first
                    batch.logits[k] = wanted
                    outputs += wanted
                batch.n_tokens = len(chunk)
                if ll.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed while scoring")
                if outputs:
                    pointer = ll.llama_get_logits(ctx)
                    rows.append(np.ctypeslib.as_array(pointer, shape=(outputs, self.n_vocab)).copy())
        finally:
            ll.llama_batch_free(batch)
        return np.concatenate(rows)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        self._context_for(len(ids) + n)
        self.clear()
        self.prompt(list(ids))
        out: list[int] = []
        for _ in range(n):
            out.append(self.last_argmax())
            if len(out) < n:
                self.step(out[-1])
        return out

    def tokenize(self, text: str) -> list[int]:
        """As llama-perplexity tokenizes: the vocabulary's own BOS rule, special tokens not parsed."""
        return [int(t) for t in self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)]

    def tokenize_prompt(self, text: str) -> list[int]:
        """As generate tokenizes a prompt (special tokens parsed)."""
        return [int(t) for t in self.model.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)]

    def embed(self, texts: list[str], batch_size: int) -> Any:
        """A second load in embedding mode: llama.cpp fixes the mode per context, with its pooling."""
        from runtimes.llama_cpp.lm import LlamaCppRuntime

        loaded = LlamaCppRuntime().load(self.path, {"embedding": True, "n_threads": self.threads,
                                                    "n_gpu_layers": -1 if self.device == "gpu" else 0},
                                        lambda *_: None)
        try:
            vectors, _, _ = loaded.embed(texts, pooling=None, normalize=True, truncate=True, batch_size=batch_size,
                                         cancelled=None)
        finally:
            loaded.close()
        return vectors

    def gpu_memory_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        self.close_context()
        self.model.close()


class _HfTokenized:
    """Tokenizing and embedding for engines over a model with a Hugging Face tokenizer (transformers, onnxruntime)."""

    tokenizer: Any
    loaded: Any

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True, verbose=False))

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.loaded.encode(text)

    def embed(self, texts: list[str], batch_size: int) -> Any:
        vectors, _, _ = self.loaded.embed(texts, pooling=None, normalize=True, truncate=True, batch_size=batch_size,
                                          cancelled=None)
        return vectors


class TransformersEngine(_HfTokenized):
    runtime = "transformers"

    def __init__(self, path: Path, *, threads: int, batch_size: int, device: str = "auto", dtype: str = "auto",
                 adapters: Sequence[tuple[Path, float]] = ()) -> None:
        import torch

        from runtimes.hf.lm import TransformersRuntime

        torch.set_num_threads(threads)
        self._torch = torch
        self.loaded = TransformersRuntime().load(path, {"device": device, "dtype": dtype}, lambda *_: None)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.device, self.dtype, self.batch_size = self.loaded.device, self.loaded.dtype, batch_size
        self.is_causal_lm = self.loaded.is_causal_lm
        self._adapters = None
        if adapters:
            from runtimes.hf.adapters import AdapterManager

            self._manager = AdapterManager(self.model)
            self._adapters = self._manager.activated(list(adapters))
            self._adapters.__enter__()
        config = self.model.config
        self.n_vocab = int(getattr(config, "vocab_size", 0) or len(self.tokenizer))
        self.context_length = self.loaded.context_length
        self.bos = self.tokenizer.bos_token_id
        probe = self.tokenizer.encode("a", add_special_tokens=True)
        self.add_bos = self.bos is not None and bool(probe) and probe[0] == self.bos
        self._past: Any = None
        self._last: Any = None
        import inspect

        # transformers 5 renamed past_key_values to cache; take whichever this version's forward has
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize()

    def _forward(self, ids: Sequence[int], keep: int = 1) -> Any:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)], device=self.device), use_cache=True, logits_to_keep=keep,
                             **{self._cache_kw: self._past})
        self._past = getattr(out, self._cache_kw)
        return out.logits

    def use_context(self, n_ctx: int) -> None:
        self.clear()

    def close_context(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._past = None
        self._last = None

    def prompt(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), self.batch_size):
            self._last = self._forward(ids[start:start + self.batch_size])
        self._sync()

    def step(self, token: int) -> None:
        self._last = self._forward([token])
        self._sync()

    def last_argmax(self) -> int:
        return int(self._torch.argmax(self._last[0, -1]))

    def logits(self, ids: Sequence[int], first: int) -> Any:
        self.clear()
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)], device=self.device), use_cache=False,
                             logits_to_keep=len(ids) - first)
        return out.logits[0].float().cpu().numpy()

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        from runtimes.hf.generate import stream_token_ids
        from runtimes.text import Sampling

        self.clear()
        return list(stream_token_ids(self.model, list(ids), Sampling(temperature=0.0), n, self.device))

    def gpu_memory_bytes(self) -> int | None:
        if self.device.startswith("cuda"):
            return int(self._torch.cuda.max_memory_allocated())
        return None

    def close(self) -> None:
        if self._adapters is not None:
            self._adapters.__exit__(None, None, None)
        self.clear()
        self.loaded.close()


class OnnxEngine(_HfTokenized):
    """An ONNX export (runtimes/onnx) on onnxruntime: the decoder graph with its past fed back at every call."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, *, threads: int, batch_size: int, device: str = "auto") -> None:
        from runtimes.onnx.runtime import OnnxRuntime

        self.loaded = OnnxRuntime().load(path, {"device": device, "n_threads": threads}, lambda *_: None)
        self.session, self.tokenizer = self.loaded.session, self.loaded.tokenizer
        self.device, self.dtype, self.batch_size = self.loaded.device, self.loaded.dtype, batch_size
        self.is_causal_lm = self.loaded.is_causal_lm
        self.n_vocab = int(self.loaded.config.get("vocab_size") or len(self.tokenizer))
        self.context_length = self.loaded.context_length
        self.bos = self.tokenizer.bos_token_id
        probe = self.tokenizer.encode("a", add_special_tokens=True)
        self.add_bos = self.bos is not None and bool(probe) and probe[0] == self.bos
        self._past: dict[str, Any] | None = None
        self._length = 0
        self._last: Any = None

    def _run(self, ids: Sequence[int]) -> Any:
        import numpy as np

        from runtimes.onnx.validate import empty_past, presents_to_past

        n = len(ids)
        past = self._past if self._past is not None else empty_past(self.session, 1)
        feeds = {"input_ids": np.array([list(ids)], dtype=np.int64),
                 "attention_mask": np.ones((1, self._length + n), dtype=np.int64),
                 "position_ids": np.arange(self._length, self._length + n, dtype=np.int64)[None], **past}
        out = self.session.run(None, feeds)
        self._past = presents_to_past(self.loaded.outputs, out)
        self._length += n
        return out[0][0]  # logits (n, vocab)

    def use_context(self, n_ctx: int) -> None:
        self.clear()

    def close_context(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._past, self._length, self._last = None, 0, None

    def prompt(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), self.batch_size):
            self._last = self._run(ids[start:start + self.batch_size])

    def step(self, token: int) -> None:
        self._last = self._run([token])

    def last_argmax(self) -> int:
        import numpy as np

        return int(np.argmax(self._last[-1]))

    def logits(self, ids: Sequence[int], first: int) -> Any:
        self.clear()
        rows = self._run(ids)[first:]
        self.clear()
        return rows

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        self.clear()
        self.prompt(list(ids))
        out: list[int] = []
        for _ in range(n):
            out.append(self.last_argmax())
            if len(out) < n:
                self.step(out[-1])
        return out

    def gpu_memory_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        self.clear()
        self.loaded.close()
