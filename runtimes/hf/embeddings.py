"""Sentence embeddings from a loaded transformers model (encoder or decoder-only), with parity to sentence-transformers.

`embed_texts(model, tokenizer, texts, pooling=...)` returns a float32 array in input order. What it does, and why:

1. Tokenize every text once, in one call to the fast tokenizer, with no padding. The exact token counts
   tell us which texts are too long (truncate=False) and let us batch by true length.
2. Sort by token count (longest first), cut into batches of `batch_size` texts, and pad each batch only to
   its own longest text (right padding, so the default positions 0..n-1 are right for encoders and, under
   the causal mask, a decoder's real tokens never see the pads). sentence-transformers sorts by *character*
   count, which mis-orders code, numbers, CJK and emoji; sorting by tokens leaves less padding with the
   same number of texts per batch.
3. Run the base model (for a causal LM: its decoder, so no LM head over every position) under
   torch.inference_mode and pool `last_hidden_state` with the attention mask: masked mean, the first real
   token (cls) or the last real token (last), whichever side the padding is on.
4. On CPU in float32, route every `F.linear` to oneDNN's fp32 linear (`_OneDNNLinear`). Same math in fp32
   with the bias fused in; on CPUs where MKL's sgemm does not use the widest vector units (MKL on AMD
   falls back to AVX2) it is about 2.3x faster per GEMM, and GEMMs are ~75% of an encoder's time.
   It is checked numerically against `F.linear` once per process and skipped when unavailable.

The max sequence length (when not given) follows sentence-transformers: the model directory's
sentence_bert_config.json `max_seq_length` (all-MiniLM-L6-v2: 256, not the tokenizer's 512), else a sane
tokenizer.model_max_length, else config.max_position_embeddings.

Torch, numpy and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from protocol.errors import Cancelled

if TYPE_CHECKING:
    import numpy as np

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "last")

# Use oneDNN for float32 linear layers on CPU (see the module docstring). A switch for benchmarks and debugging.
FAST_CPU_LINEAR = True

_INSANE_MAX_LENGTH = 1_000_000  # tokenizers without a limit report int(1e30)

# sentence-transformers' Pooling config: new-style "pooling_mode" strings and legacy boolean flags.
_ST_MODES = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls",
             "lasttoken": "last", "last": "last"}


class InputTooLong(ValueError):
    """A text has more tokens than the model takes, and truncation was turned off."""

    def __init__(self, index: int, tokens: int, max_length: int) -> None:
        super().__init__(f"text {index} has {tokens} tokens; the model takes at most {max_length} (truncate is off)")
        self.index = index
        self.tokens = tokens
        self.max_length = max_length


class EmptyInput(ValueError):
    """A text tokenizes to nothing (possible with tokenizers that add no special tokens), so it has no vector."""

    def __init__(self, index: int) -> None:
        super().__init__(f"text {index} has no tokens to embed")
        self.index = index


# --- configuration from the model directory ---------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sentence_transformers_pooling(model_dir: Path) -> Pooling | None:
    """The pooling named by a sentence-transformers directory (modules.json -> <Pooling folder>/config.json)."""
    modules = _read_json_list(model_dir / "modules.json")
    folders = [str(m.get("path", "")) for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    for folder in folders or ["1_Pooling"]:
        config = _read_json(model_dir / folder / "config.json")
        if config is None:
            continue
        mode = config.get("pooling_mode")
        if isinstance(mode, str):
            return _ST_MODES.get(mode)  # type: ignore[return-value]
        for flag in ("lasttoken", "cls_token", "mean_tokens"):  # legacy boolean flags
            if config.get(f"pooling_mode_{flag}"):
                return _ST_MODES[flag]  # type: ignore[return-value]
    return None


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def default_pooling(model_dir: Path, is_causal_lm: bool) -> Pooling:
    """The pooling a model was trained with, from its sentence-transformers config; else masked mean.

    A sentence-transformers directory says what it was trained with (modules.json -> <folder>/config.json:
    mean, cls or lasttoken); we follow it, as decoder embedding models such as e5-mistral or
    Qwen3-Embedding say `lasttoken` there. Without such a config we use the masked mean for encoders
    *and* decoders: a plain causal LM's last hidden state is shaped for predicting the next token, not for
    summarizing the text, and the mean over all real tokens is the more robust zero-shot sentence vector
    (it is also what SGPT-style work found for untuned decoders). Modes we do not implement (max,
    weightedmean, mean_sqrt_len) fall back to mean. `is_causal_lm` is accepted for callers and future
    defaults; today both kinds get the mean.
    """
    del is_causal_lm  # same default for both kinds; see the docstring
    return _sentence_transformers_pooling(Path(model_dir)) or "mean"


def resolve_max_length(tokenizer: Any, model: Any = None, model_dir: Path | str | None = None) -> int | None:
    """The longest input (in tokens) the model takes, decided the way sentence-transformers decides it.

    sentence_bert_config.json `max_seq_length` when the directory has one (model_dir, or the directory the
    model was loaded from), else tokenizer.model_max_length when it is a real limit; either way no more
    than config.max_position_embeddings.
    """
    if model_dir is None and model is not None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        model_dir = name if name and Path(name).is_dir() else None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) and positions > 0 else None

    limit = None
    if model_dir is not None:
        st_config = _read_json(Path(model_dir) / "sentence_bert_config.json") or {}
        if isinstance(st_config.get("max_seq_length"), int) and st_config["max_seq_length"] > 0:
            limit = st_config["max_seq_length"]
    if limit is None:
        tokenizer_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _INSANE_MAX_LENGTH:
            limit = tokenizer_max
    if limit is None or positions is None:
        return limit if limit is not None else positions
    return min(limit, positions)


# --- the fast fp32 linear on CPU --------------------------------------------------------------------------

_onednn_checked: bool | None = None
_onednn_lock = threading.Lock()


def _onednn_linear_works() -> bool:
    """Whether oneDNN's fp32 linear exists here and matches F.linear (checked once per process)."""
    global _onednn_checked
    with _onednn_lock:
        if _onednn_checked is None:
            _onednn_checked = False
            try:
                import torch

                if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
                    generator = torch.Generator().manual_seed(0)
                    x = torch.randn(3, 5, 64, generator=generator)
                    w = torch.randn(48, 64, generator=generator)
                    b = torch.randn(48, generator=generator)
                    with torch.inference_mode():
                        ours = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                        ref = torch.nn.functional.linear(x, w, b)
                    _onednn_checked = ours.shape == ref.shape and bool(torch.allclose(ours, ref, rtol=1e-4, atol=1e-4))
            except Exception:  # noqa: BLE001 - any failure means: use the stock path
                _onednn_checked = False
        return _onednn_checked


@functools.cache
def _onednn_linear_mode_class() -> type:
    import torch
    from torch.overrides import TorchFunctionMode

    linear = torch.nn.functional.linear
    onednn = torch.ops.mkldnn._linear_pointwise
    dense_types = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as FakeTensor or DTensor

    def plain(t: Any) -> bool:
        return type(t) in dense_types and t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided

    class OneDNNLinear(TorchFunctionMode):
        """Sends float32 CPU `F.linear(x, weight, bias)` to oneDNN's linear; everything else runs as usual."""

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if func is linear and len(args) >= 2 and kwargs.keys() <= {"bias"}:
                x, weight = args[0], args[1]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if (plain(x) and x.dim() >= 2 and x.numel() > 0 and plain(weight) and weight.dim() == 2
                        and weight.is_contiguous() and (bias is None or plain(bias))):
                    return onednn(x, weight, bias, "none", [], "")
            return func(*args, **kwargs)

    return OneDNNLinear


def _onednn_linear_mode() -> Any:
    """A context in which float32 CPU linear layers run on oneDNN. The model itself is not modified."""
    return _onednn_linear_mode_class()()


# --- the embedding path ---------------------------------------------------------------------------------

_forward_kwargs_cache: dict[type, bool] = {}


def _takes_use_cache(base: Any) -> bool:
    cls = type(base)
    if cls not in _forward_kwargs_cache:
        import inspect

        try:
            _forward_kwargs_cache[cls] = "use_cache" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            _forward_kwargs_cache[cls] = False
    return _forward_kwargs_cache[cls]


def _base_model(model: Any) -> Any:
    """The transformer without its head: BertModel stays itself; LlamaForCausalLM -> its LlamaModel."""
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def pool_hidden(hidden: Any, mask: Any, pooling: Pooling) -> Any:
    """Pool (batch, seq, dim) hidden states with a (batch, seq) 0/1 mask; left or right padding both work."""
    import torch

    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        return summed / weights.sum(dim=1).clamp(min=1e-9)
    if pooling == "cls":
        first = mask.to(torch.int32).argmax(dim=1)  # first real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if pooling == "last":
        seq = mask.shape[1]
        last = seq - 1 - mask.to(torch.int32).flip(1).argmax(dim=1)  # last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def tokenize(tokenizer: Any, texts: Sequence[str], *, truncate: bool, max_length: int | None) -> list[list[int]]:
    """Token ids of every text (special tokens included), truncated to max_length when truncate is on.

    Raises InputTooLong (truncate off, a text over max_length) or EmptyInput (a text with no tokens at all).
    """
    if truncate and max_length is not None:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=False)
    else:
        encoded = tokenizer(list(texts), truncation=False, padding=False, verbose=False,
                            return_attention_mask=False, return_token_type_ids=False)
    ids: list[list[int]] = encoded["input_ids"]
    for index, row in enumerate(ids):
        if not row:
            raise EmptyInput(index)
        if not truncate and max_length is not None and len(row) > max_length:
            raise InputTooLong(index, len(row), max_length)
    return ids


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, pooling: Pooling, normalize: bool = True,
                truncate: bool = True, max_length: int | None = None, batch_size: int = 32, device: str = "cpu",
                cancelled: threading.Event | None = None) -> tuple[np.ndarray, int]:
    """Embed texts; returns (float32 array (len(texts), dim) in input order, number of real tokens processed).

    Texts are tokenized once, sorted by token count and batched `batch_size` at a time, each batch padded
    only to its longest text. truncate=False raises InputTooLong for the first text over the limit; a text
    with no tokens at all (only possible when the tokenizer adds no special tokens) raises EmptyInput.
    `cancelled` is checked before every batch; when set, protocol.errors.Cancelled({"done": n}) is raised,
    n being how many texts were embedded.
    """
    import numpy as np
    import torch

    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if max_length is None:
        max_length = resolve_max_length(tokenizer, model)

    base = _base_model(model)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not texts:
        return np.zeros((0, int(hidden_size or 0)), dtype=np.float32), 0

    ids = tokenize(tokenizer, texts, truncate=truncate, max_length=max_length)
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")  # longest first: the first batch shows a memory problem early
    pad_id = _pad_id(tokenizer)
    extra = {"use_cache": False} if _takes_use_cache(base) else {}

    fast = (FAST_CPU_LINEAR and str(device).startswith("cpu") and next(base.parameters()).dtype == torch.float32
            and _onednn_linear_works())
    out: np.ndarray | None = None
    done = 0
    with torch.inference_mode(), (_onednn_linear_mode() if fast else contextlib.nullcontext()):
        for start in range(0, len(order), batch_size):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled({"done": done})
            chosen = order[start:start + batch_size]
            width = int(lengths[chosen[0]])
            input_ids = np.full((len(chosen), width), pad_id, dtype=np.int64)
            attention = np.zeros((len(chosen), width), dtype=np.int64)
            for row, index in enumerate(chosen):
                n = int(lengths[index])
                input_ids[row, :n] = ids[index]
                attention[row, :n] = 1
            mask = torch.from_numpy(attention).to(device)
            hidden = base(input_ids=torch.from_numpy(input_ids).to(device), attention_mask=mask, **extra).last_hidden_state
            vectors = pool_hidden(hidden, mask, pooling).float()
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[chosen] = vectors.cpu().numpy()
            done += len(chosen)
    assert out is not None
    return out, int(lengths.sum())

