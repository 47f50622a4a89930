"""Our own Hugging Face -> GGUF writer for Llama-shaped causal LMs (Llama, Mistral, SmolLM, Qwen2).

Why not llama.cpp's convert_hf_to_gguf.py: it ships only in the llama.cpp source tree (neither the
gguf nor the llama-cpp-python wheel has it), it needs torch, and it is a script, not an API. This
module is the narrow piece we need instead, built on gguf-py's GGUFWriter: it streams the
safetensors files into the GGUF a chunk at a time (peak memory about one output tensor, not the
model), reports progress, and refuses what it cannot convert faithfully with `UnsupportedModel`
rather than writing a file that loads but answers wrong. tests/test_gguf_parity.py holds it to
llama.cpp itself: same prompt tokens as the Hugging Face tokenizer, same greedy tokens as
transformers.

Conventions follow llama.cpp's reader (gguf-py constants, convert_hf_to_gguf.py), re-derived here:
- Tensor names: token_embd, blk.N.attn_{q,k,v,output,norm}, blk.N.ffn_{gate,up,down,norm},
  output_norm, output (absent when the embeddings are tied; llama.cpp then reuses token_embd).
- Q/K rows are permuted for the "llama" arch: transformers stores each head's rotary halves
  split (rotate_half), llama.cpp's LLAMA rope pairs adjacent values. Qwen2 keeps the HF layout
  (llama.cpp runs it with the NEOX rope), so it is written unpermuted, biases included.
- 1-D tensors (norms, biases) stay float32 in an f16 file, as llama.cpp expects.
- Mistral's sliding_window is not written (llama.cpp's "llama" arch has none, as with its own
  converter): outputs agree with transformers while the context stays within the window.
- Tokenizers: byte-level BPE from tokenizer.json ("gpt2" model, with the llama.cpp pre-tokenizer
  whose regex equals ours), or a SentencePiece BPE tokenizer.model ("llama" model, scores and
  byte tokens). Special ids, add_bos/add_eos and the chat template come from the tokenizer files.

Heavy imports (numpy, safetensors, gguf) happen inside the functions, so importing this is cheap.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}  # SmolLM uses LlamaForCausalLM

ProgressFn = Callable[[int, int, str], None]

_FILE_TYPES = {"f32": 0, "f16": 1}  # gguf.LlamaFileType.ALL_F32 / MOSTLY_F16

# gguf.TokenType values (llama.cpp's token attributes).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class _ArchRule:
    gguf_arch: str
    permute_qk: bool  # llama.cpp's LLAMA rope (adjacent pairs) needs HF's split-half rows reordered


_ARCH_RULES = {
    "LlamaForCausalLM": _ArchRule("llama", permute_qk=True),
    "MistralForCausalLM": _ArchRule("llama", permute_qk=True),  # llama.cpp runs Mistral as "llama"
    "Qwen2ForCausalLM": _ArchRule("qwen2", permute_qk=False),
}


@dataclass(frozen=True)
class _HParams:
    """The config values the GGUF header needs, validated once."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    tied_embeddings: bool


@dataclass
class _Tensor:
    """One output tensor, known from the safetensors header before any data is read."""

    gguf_name: str
    hf_name: str
    source: Path
    shape: tuple[int, ...]
    source_dtype: str
    out_dtype: str  # "f32" or "f16"
    permute_heads: int = 0  # >0: reorder rows for llama.cpp's rope with this many heads

    @property
    def out_nbytes(self) -> int:
        return _count(self.shape) * (2 if self.out_dtype == "f16" else 4)


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None


# --------------------------------------------------------------------------------------------
# Public entry point


def convert_to_gguf(
    model_dir: Path,
    out_path: Path,
    *,
    dtype: str = "f16",
    progress: ProgressFn | None = None,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Write a GGUF file for the HF model in model_dir to out_path (the caller handles atomic
    placement; exactly out_path is written, and removed again if conversion fails).

    dtype: 'f32' or 'f16' (1-D tensors such as norms stay f32, as llama.cpp expects).
    metadata: extra string keys (e.g. general.name, general.source.url) that may override
    general.* values but not the architecture or tokenizer keys.
    Returns stats: tensors, bytes, seconds, vocab_size, parameters, and what was chosen.
    Raises UnsupportedModel for an architecture, config or tokenizer we cannot convert faithfully.
    """
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    started = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _read_json(model_dir / "config.json")
    hf_arch, rule = _architecture(config)
    hparams = _hparams(config, hf_arch)
    plan = _plan_tensors(_scan_weights(model_dir), hparams, rule, dtype)
    n_vocab = next(t.shape[0] for t in plan if t.gguf_name == "token_embd.weight")
    vocab = _read_vocab(model_dir, config, n_vocab)

    try:
        _write_gguf(out_path, rule.gguf_arch, hparams, vocab, plan, dtype, model_dir, metadata, progress)
    except BaseException:
        out_path.unlink(missing_ok=True)  # never leave a half-written file behind
        raise

    parameters = sum(_count(t.shape) for t in plan)
    return {
        "tensors": len(plan),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "vocab_size": n_vocab,
        "parameters": parameters,
        "architecture": hf_arch,
        "gguf_architecture": rule.gguf_arch,
        "dtype": dtype,
        "file_type": _FILE_TYPES[dtype],
        "tokenizer": vocab.model,
        "tokenizer_pre": vocab.pre,
        "largest_tensor_bytes": max(t.out_nbytes for t in plan),
    }


# --------------------------------------------------------------------------------------------
# Config


_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _architecture(config: dict[str, Any]) -> tuple[str, _ArchRule]:
    """The HF class from config.architectures, or from model_type when a config was saved
    without it (config.save_pretrained on a bare config does not record architectures)."""
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    name = names[0] if names else _MODEL_TYPES.get(model_type, f"<none; model_type={model_type!r}>")
    if name not in _ARCH_RULES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise UnsupportedModel(
            f"GGUF export does not support architecture {name}; supported: {supported}",
            architecture=name,
        )
    return name, _ARCH_RULES[name]


def _hparams(config: dict[str, Any], hf_arch: str) -> _HParams:
    """Read and validate the config; anything llama.cpp would compute differently is refused."""
    activation = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if activation != "silu":
        raise UnsupportedModel(f"{hf_arch} with hidden_act={activation!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise UnsupportedModel(f"{hf_arch} with mlp_bias=true is not supported")
    if config.get("use_sliding_window"):  # Qwen2's switch; llama.cpp's qwen2 arch attends fully
        raise UnsupportedModel(f"{hf_arch} with use_sliding_window=true is not supported")
    rope_type = _rope_type(config)
    if rope_type not in (None, "default"):
        raise UnsupportedModel(
            f"{hf_arch} with rope scaling {rope_type!r} is not supported yet (only unscaled rope)",
            rope_type=rope_type,
        )
    n_heads = int(config["num_attention_heads"])
    n_kv_heads = int(config.get("num_key_value_heads") or n_heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv_heads or head_dim % 2:
        raise UnsupportedModel(
            f"{hf_arch} with {n_heads} heads, {n_kv_heads} kv heads, head_dim {head_dim} is inconsistent"
        )
    return _HParams(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_size=int(config["intermediate_size"]),
        context_length=int(config.get("max_position_embeddings") or 2048),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_theta(config)),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_theta(config: dict[str, Any]) -> float:
    """transformers 5 nests rope_theta under rope_parameters; older configs keep it at the top."""
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return config.get("rope_theta", 10000.0)


def _rope_type(config: dict[str, Any]) -> str | None:
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key)
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind not in (None, "default"):
                return str(kind)
    return None


# --------------------------------------------------------------------------------------------
# Weights: index the safetensors headers, then plan every output tensor before reading data


@dataclass(frozen=True)
class _Source:
    path: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...


def _scan_weights(model_dir: Path) -> dict[str, _Source]:
    """Every tensor name with its file, shape and dtype, from headers only (no tensor data)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{model_dir} has no .safetensors weights (pickle checkpoints are not converted)")
    sources: dict[str, _Source] = {}
    for name in files:
        path = model_dir / name
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                sources[key] = _Source(path, tuple(piece.get_shape()), str(piece.get_dtype()))
    return sources


_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_RE.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def _plan_tensors(sources: dict[str, _Source], hp: _HParams, rule: _ArchRule, dtype: str) -> list[_Tensor]:
    """Map every HF tensor to its GGUF name, dtype and permutation, in llama.cpp's usual order."""
    plan: list[_Tensor] = []
    unknown: list[str] = []
    for hf_name, source in sources.items():
        if _IGNORED_RE.search(hf_name) or (hf_name == "lm_head.weight" and hp.tied_embeddings):
            continue
        gguf_name = _gguf_name(hf_name)
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        if source.dtype not in _FLOAT_DTYPES:
            raise UnsupportedModel(f"tensor {hf_name} has dtype {source.dtype}; only float checkpoints are converted")
        out_dtype = "f16" if dtype == "f16" and len(source.shape) > 1 else "f32"
        plan.append(_Tensor(gguf_name, hf_name, source.path, source.shape, source.dtype, out_dtype,
                            _permute_heads(gguf_name, hp, rule)))
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise UnsupportedModel(
            f"GGUF export does not know {len(unknown)} tensor(s), e.g. {shown}", tensors=sorted(unknown)
        )
    _check_plan(plan, hp)
    return sorted(plan, key=_tensor_order)


def _permute_heads(gguf_name: str, hp: _HParams, rule: _ArchRule) -> int:
    if not rule.permute_qk:
        return 0
    if ".attn_q." in gguf_name:
        return hp.n_heads
    if ".attn_k." in gguf_name:
        return hp.n_kv_heads
    return 0


def _check_plan(plan: list[_Tensor], hp: _HParams) -> None:
    """Catch a config that disagrees with the weights here, not as a llama.cpp load failure."""
    names = {t.gguf_name: t for t in plan}
    required = ["token_embd.weight", "output_norm.weight"]
    parts = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm")
    for layer in range(hp.n_layers):
        required += [f"blk.{layer}.{part}.weight" for part in parts]
    missing = [name for name in required if name not in names]
    if missing:
        raise UnsupportedModel(
            f"checkpoint lacks {len(missing)} tensor(s) a {hp.n_layers}-layer model needs, e.g. {missing[0]}"
        )
    embed = names["token_embd.weight"].shape
    if embed[1] != hp.hidden_size:
        raise UnsupportedModel(f"embedding width {embed[1]} differs from hidden_size {hp.hidden_size}")
    q_rows = names["blk.0.attn_q.weight"].shape[0]
    k_rows = names["blk.0.attn_k.weight"].shape[0]
    if q_rows != hp.n_heads * hp.head_dim or k_rows != hp.n_kv_heads * hp.head_dim:
        raise UnsupportedModel(f"attention shapes ({q_rows}, {k_rows}) do not match heads x head_dim in the config")


def _tensor_order(tensor: _Tensor) -> tuple[int, int, str]:
    name = tensor.gguf_name
    if name.startswith("token_embd"):
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0, name)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# --------------------------------------------------------------------------------------------
# Writing


def _write_gguf(
    out_path: Path,
    gguf_arch: str,
    hp: _HParams,
    vocab: _Vocab,
    plan: list[_Tensor],
    dtype: str,
    model_dir: Path,
    metadata: dict[str, str] | None,
    progress: ProgressFn | None,
) -> None:
    """Header and tensor infos first (all known from the plan), then each tensor's data in turn,
    so only one tensor is ever in memory (GGUFWriter's add_tensor_info + write_tensor_data)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(out_path), gguf_arch)
    try:
        _add_general(writer, model_dir, dtype, gguf_arch, metadata)
        _add_hparams(writer, hp, len(vocab.tokens))
        _add_vocab(writer, vocab)
        for tensor in plan:
            np_dtype = np.dtype(np.float16 if tensor.out_dtype == "f16" else np.float32)
            writer.add_tensor_info(tensor.gguf_name, tensor.shape, np_dtype, tensor.out_nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = len(plan)
        for done, tensor in enumerate(plan, start=1):
            data = _load_tensor(tensor)
            writer.write_tensor_data(data)
            del data  # before the next one is read
            if progress is not None:
                progress(done, total, f"wrote {tensor.gguf_name} {list(tensor.shape)} {tensor.out_dtype}")
    finally:
        writer.close()


def _add_general(writer: Any, model_dir: Path, dtype: str, gguf_arch: str, metadata: dict[str, str] | None) -> None:
    strings = {"general.type": "model", "general.name": model_dir.name}
    for key, value in (metadata or {}).items():
        if key.startswith(("tokenizer.", f"{gguf_arch}.")) or key in ("general.architecture", "general.file_type"):
            raise ValueError(f"metadata key {key!r} would override a structural GGUF key")
        strings[key] = str(value)
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.add_file_type(_FILE_TYPES[dtype])


def _add_hparams(writer: Any, hp: _HParams, n_vocab: int) -> None:
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn_size)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.head_dim * hp.n_heads != hp.hidden_size:  # llama.cpp otherwise assumes hidden / heads
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)


def _add_vocab(writer: Any, vocab: _Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)  # always explicit: llama.cpp's defaults differ per model
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


_CHUNK_BYTES = 16 << 20  # source bytes read at a time: bounds memory beyond the output tensor


def _load_tensor(tensor: _Tensor) -> Any:
    """The tensor as written: read in row chunks, reordered for rope where needed, cast into one
    preallocated output array, so memory is that array plus one chunk, whatever the source dtype."""
    import numpy as np

    out = np.empty(tensor.shape, dtype=np.float16 if tensor.out_dtype == "f16" else np.float32)
    rows = tensor.shape[0]
    row_bytes = _count(tensor.shape[1:]) * _ITEM_SIZES[tensor.source_dtype]
    step = max(1, _CHUNK_BYTES // row_bytes)
    head_rows = rows // tensor.permute_heads if tensor.permute_heads else 1
    step = max(head_rows, step // head_rows * head_rows)  # permutation works on whole heads
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = _read_rows(tensor, start, stop)
        if tensor.permute_heads:
            part = _permute_for_rope(part, (stop - start) // head_rows)
        out[start:stop] = part
    return out


_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _read_rows(tensor: _Tensor, start: int, stop: int) -> Any:
    """Rows [start, stop) of one source tensor. A fresh safe_open per chunk: closing it unmaps
    the pages just read, so a multi-GB checkpoint's mapped pages never pile up in resident memory."""
    if tensor.source_dtype == "BF16":
        return _read_bf16_rows(tensor.source, tensor.hf_name, start, stop)
    from safetensors import safe_open

    with safe_open(str(tensor.source), framework="numpy") as handle:
        return handle.get_slice(tensor.hf_name)[start:stop]


def _read_bf16_rows(path: Path, name: str, start: int, stop: int) -> Any:
    """numpy has no bfloat16 (so safetensors' numpy reader refuses it): read the raw rows via the
    safetensors header and widen exactly, a bfloat16 being the top half of a float32."""
    import numpy as np

    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        info = json.loads(handle.read(header_len))[name]
        shape = info["shape"]
        row_bytes = _count(tuple(shape[1:])) * 2
        handle.seek(8 + header_len + info["data_offsets"][0] + start * row_bytes)
        wide = np.frombuffer(handle.read((stop - start) * row_bytes), dtype="<u2").astype("<u4")
    wide <<= 16  # in place: one float32-sized temporary per chunk
    return wide.view(np.float32).reshape(stop - start, *shape[1:])


def _permute_for_rope(weights: Any, n_heads: int) -> Any:
    """Per head, interleave the two rotary halves: HF row order (x0..x{d/2-1}, y0..y{d/2-1})
    becomes (x0, y0, x1, y1, ...), the adjacent pairs llama.cpp's LLAMA rope rotates.
    Works for weights [rows, cols] and biases [rows]."""
    rows = weights.shape[0]
    half = rows // n_heads // 2
    split = weights.reshape(n_heads, 2, half, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


# --------------------------------------------------------------------------------------------
# Tokenizer


def _read_vocab(model_dir: Path, config: dict[str, Any], n_vocab: int) -> _Vocab:
    """SentencePiece when tokenizer.model exists (as llama.cpp's converter prefers), else the
    byte-level BPE in tokenizer.json; other tokenizers are refused."""
    tokenizer_config = _read_json_if(model_dir / "tokenizer_config.json")
    if (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(model_dir / "tokenizer.model", tokenizer_config, n_vocab)
        default_add_bos = True  # LlamaTokenizer's default
    elif (model_dir / "tokenizer.json").is_file():
        vocab = _bpe_vocab(_read_json(model_dir / "tokenizer.json"), n_vocab)
        default_add_bos = False
    else:
        raise UnsupportedModel(f"{model_dir} has neither tokenizer.json nor tokenizer.model")
    token_ids = {token: i for i, token in enumerate(vocab.tokens)}
    vocab.special_ids = _special_ids(model_dir, tokenizer_config, config, token_ids)
    post = _post_processor_flags(model_dir / "tokenizer.json", vocab.special_ids)
    vocab.add_bos = _flag(tokenizer_config.get("add_bos_token"), post.get("add_bos"), default_add_bos)
    vocab.add_eos = _flag(tokenizer_config.get("add_eos_token"), post.get("add_eos"), False)
    vocab.chat_template = _chat_template(model_dir, tokenizer_config)
    return vocab


def _flag(*choices: bool | None) -> bool:
    return next(bool(choice) for choice in choices if choice is not None)


# Pre-tokenizer regexes of tokenizer.json, by the llama.cpp pre-tokenizer that splits identically.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
_IGNORES_MERGES = {"llama-bpe"}  # llama.cpp sets ignore_merges for these pre types only


def _bpe_vocab(tokenizer_json: dict[str, Any], n_vocab: int) -> _Vocab:
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModel(
            f"tokenizer.json model {model.get('type')!r} is not supported without tokenizer.model (only byte-level BPE)"
        )
    if model.get("byte_fallback"):
        raise UnsupportedModel("tokenizer.json BPE with byte_fallback (SentencePiece-style) needs its tokenizer.model")
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":  # llama.cpp applies no normalizer; NFC is a no-op on NFC text
        raise UnsupportedModel(f"tokenizer.json normalizer {normalizer.get('type')!r} is not supported")
    pre = _pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
    if bool(model.get("ignore_merges")) != (pre in _IGNORES_MERGES):
        raise UnsupportedModel(
            f"tokenizer.json ignore_merges={model.get('ignore_merges')} differs from llama.cpp's {pre!r} pre-tokenizer"
        )

    too_big = [t for t, i in model["vocab"].items() if i >= n_vocab]
    if too_big:
        raise UnsupportedModel(f"tokenizer has {len(too_big)} token(s) beyond the model's {n_vocab} embeddings")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_UNUSED] * n_vocab
    for token, token_id in model["vocab"].items():
        if token_id < n_vocab:
            tokens[token_id], types[token_id] = token, _NORMAL
    for added in tokenizer_json.get("added_tokens") or []:
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return _Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer whose split regexes equal this tokenizer.json's pre_tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        raise UnsupportedModel(f"tokenizer.json pre_tokenizer {kinds or None} is not byte-level BPE")
    if byte_level.get("add_prefix_space"):
        raise UnsupportedModel("byte-level BPE with add_prefix_space=true is not supported (llama.cpp adds none)")
    uses_gpt2_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_gpt2_regex:
        return "smollm"  # SmolLM/SmolLM2: single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not uses_gpt2_regex:
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex in _SPLIT_PRES and split.get("behavior") == "Isolated" and not split.get("invert"):
            return _SPLIT_PRES[regex]
    raise UnsupportedModel(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} has no known llama.cpp equivalent")


def _special_ids(model_dir: Path, tokenizer_config: dict[str, Any], config: dict[str, Any],
                 token_ids: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: by token text from the tokenizer files, else the ids in config.json."""
    special_map = _read_json_if(model_dir / "special_tokens_map.json")
    found: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = tokenizer_config.get(f"{kind}_token") or special_map.get(f"{kind}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in token_ids:
            found[kind] = token_ids[value]
            continue
        fallback = config.get(f"{kind}_token_id")
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        if isinstance(fallback, int) and 0 <= fallback < len(token_ids):
            found[kind] = fallback
    return found


def _post_processor_flags(tokenizer_json_path: Path, special_ids: dict[str, int]) -> dict[str, bool]:
    """Whether tokenizer.json's TemplateProcessing puts bos first / eos last on a single text."""
    if not tokenizer_json_path.is_file():
        return {}
    post = _read_json(tokenizer_json_path).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    template = next((s for s in steps if s.get("type") == "TemplateProcessing"), None)
    if template is None:
        return {"add_bos": False, "add_eos": False}
    items = template.get("single") or []
    specials = template.get("special_tokens") or {}

    def special_id(item: dict[str, Any]) -> int | None:
        token = (item.get("SpecialToken") or {}).get("id")
        ids = (specials.get(token) or {}).get("ids") or []
        return ids[0] if ids else None

    first, last = (special_id(items[0]), special_id(items[-1])) if items else (None, None)
    return {
        "add_bos": first is not None and first == special_ids.get("bos"),
        "add_eos": last is not None and last == special_ids.get("eos"),
    }


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    template = tokenizer_config.get("chat_template")
    if template:
        return template
    jinja = model_dir / "chat_template.jinja"  # where transformers 5 saves it
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return _read_json_if(model_dir / "chat_template.json").get("chat_template")


# SentencePiece -----------------------------------------------------------------------------


def _sentencepiece_vocab(path: Path, tokenizer_config: dict[str, Any], n_vocab: int) -> _Vocab:
    """llama.cpp's "llama" (SPM) vocab: every piece with its score and type, byte tokens included."""
    model = _parse_sentencepiece(path.read_bytes())
    if model["model_type"] != 2:  # trainer_spec.model_type: 1 unigram, 2 bpe, 3 word, 4 char
        kind = {1: "unigram", 3: "word", 4: "char"}.get(model["model_type"], str(model["model_type"]))
        raise UnsupportedModel(f"SentencePiece {kind} models are not supported (llama.cpp's llama vocab is BPE)")
    pieces = model["pieces"]
    if len(pieces) > n_vocab:
        raise UnsupportedModel(f"tokenizer.model has {len(pieces)} pieces but the model only {n_vocab} embeddings")
    tokens = [piece for piece, _, _ in pieces] + [f"[PAD{i}]" for i in range(len(pieces), n_vocab)]
    scores = [score for _, score, _ in pieces] + [-1000.0] * (n_vocab - len(pieces))
    types = [kind for _, _, kind in pieces] + [_UNUSED] * (n_vocab - len(pieces))
    for token_id, added in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        index = int(token_id)
        if index < n_vocab and (index >= len(pieces) or tokens[index] != added["content"]):
            tokens[index] = added["content"]
            types[index] = _CONTROL if added.get("special") else _USER_DEFINED
            scores[index] = -1000.0
    add_prefix = tokenizer_config.get("add_prefix_space")
    return _Vocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        add_space_prefix=model["add_dummy_prefix"] if add_prefix is None else bool(add_prefix),
    )


def _parse_sentencepiece(blob: bytes) -> dict[str, Any]:
    """The fields we need from a sentencepiece ModelProto, read straight from the protobuf wire
    format (pieces=1{piece=1, score=2, type=3}, trainer_spec=2{model_type=3},
    normalizer_spec=3{add_dummy_prefix=3}) so conversion needs no sentencepiece install."""
    pieces: list[tuple[str, float, int]] = []
    model_type, add_dummy_prefix = 1, True  # proto defaults
    for number, value in _proto_fields(blob):
        if number == 1:
            piece, score, kind = "", 0.0, _NORMAL
            for sub, sub_value in _proto_fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            pieces.append((piece, score, kind))
        elif number == 2:
            model_type = next((v for n, v in _proto_fields(value) if n == 3), model_type)
        elif number == 3:
            add_dummy_prefix = bool(next((v for n, v in _proto_fields(value) if n == 3), add_dummy_prefix))
    return {"pieces": pieces, "model_type": model_type, "add_dummy_prefix": add_dummy_prefix}


def _proto_fields(blob: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(blob):
        key, pos = _varint(blob, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(blob, pos)
        elif wire == 1:
            value, pos = blob[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(blob, pos)
            value, pos = blob[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = blob[pos:pos + 4], pos + 4
        else:
            raise UnsupportedModel(f"tokenizer.model is not a SentencePiece model (protobuf wire type {wire})")
        yield number, value


def _varint(blob: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = blob[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_json_if(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}
