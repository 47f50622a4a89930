"""Our own Hugging Face -> GGUF writer: Llama (SmolLM, TinyLlama), Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), Phi-3 and BERT encoders, in f32, f16, bf16 or q8_0.

Why not llama.cpp's convert_hf_to_gguf.py: it ships only in the llama.cpp source tree (neither the
gguf nor the llama-cpp-python wheel has it), it needs torch and transformers, it names a BPE
pre-tokenizer only by hashing the output of known tokenizers (so a locally trained one is refused),
and it is a script, not an API. This is the narrow piece we need instead, built on gguf-py's
GGUFWriter: it streams the safetensors files into the GGUF a chunk at a time (peak memory about one
output tensor, not the model), reports progress, and refuses what it cannot convert faithfully with
`UnsupportedModel` rather than writing a file that loads but answers wrong. tests/test_gguf_parity.py
and tests/test_gguf_archs.py hold it to llama.cpp itself (same prompt tokens as the Hugging Face
tokenizer, same greedy tokens as transformers, same embeddings); bench/export.py compares the files
with the converter's, tensor by tensor.

The per-architecture knowledge lives in runtimes/gguf/arch.py, the tokenizer in runtimes/gguf/vocab.py.
Here: the tensor plan and the writing.
- Tensor order: token_embd (and the other embeddings), then the blocks by layer, then the rest.
- File types as llama.cpp's converter writes them: 1-D tensors (norms, biases) and BERT's position
  and token-type embeddings stay float32; every other tensor takes the file type. q8_0 and bf16 are
  encoded with gguf-py's quants module (the converter's code path), per chunk of rows, which gives
  the same bytes as whole tensors since both encode row by row; a row length q8_0 cannot hold (not
  a multiple of 32) falls back to f16, as in the converter.

Heavy imports (numpy, safetensors, gguf) happen inside the functions, so importing this is cheap.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel
from runtimes.gguf import arch
from runtimes.gguf.arch import SUPPORTED_ARCHITECTURES, ArchRule, HParams
from runtimes.gguf.vocab import LLAMA3_REGEX as _LLAMA3_REGEX  # noqa: F401  (tests name the regexes from here)
from runtimes.gguf.vocab import QWEN2_REGEX as _QWEN2_REGEX  # noqa: F401
from runtimes.gguf.vocab import Vocab, add_to_writer, read_json, read_vocab

__all__ = ["SUPPORTED_ARCHITECTURES", "convert_to_gguf"]

ProgressFn = Callable[[int, int, str], None]

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
_QUANTIZED = {"q8_0": (32, 34), "bf16": (1, 2)}  # block size (values), block bytes

# runtimes/gguf/lora.py reads the base model the way the writer does, through these names.
_architecture = arch.architecture
_hparams = arch.hparams
_gguf_name = arch.gguf_name
_read_json = read_json


@dataclass
class _Tensor:
    """One output tensor, known from the safetensors header before any data is read."""

    gguf_name: str
    hf_name: str
    source: Path
    shape: tuple[int, ...]
    source_dtype: str
    out_dtype: str  # "f32", "f16", "bf16" or "q8_0"
    permute_heads: int = 0  # >0: reorder rows for llama.cpp's rope with this many heads
    shift: float = 0.0  # added to every value (Gemma's norms)

    @property
    def out_nbytes(self) -> int:
        if self.out_dtype in _QUANTIZED:
            block, block_bytes = _QUANTIZED[self.out_dtype]
            return _count(self.shape) // block * block_bytes
        return _count(self.shape) * (2 if self.out_dtype == "f16" else 4)


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

    dtype: 'f32', 'f16', 'bf16' or 'q8_0' (1-D tensors such as norms stay f32, as llama.cpp expects).
    metadata: extra string keys (e.g. general.name, general.source.url) that may override
    general.* values but not the architecture or tokenizer keys.
    Returns stats: tensors, bytes, seconds, vocab_size, parameters, and what was chosen.
    Raises UnsupportedModel for an architecture, config or tokenizer we cannot convert faithfully.
    """
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(_FILE_TYPES)}, not {dtype!r}")
    started = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = read_json(model_dir / "config.json")
    hf_arch, rule = arch.architecture(config)
    hp = arch.hparams(config, hf_arch)
    plan = _plan_tensors(_scan_weights(model_dir), hp, rule, dtype)
    vocab = read_vocab(model_dir, config, hp.vocab_size)
    keys = list(hp.keys) + arch.pooling_keys(model_dir, rule.gguf_arch)
    _check_name(str((metadata or {}).get("general.name", model_dir.name)), vocab)

    try:
        _write_gguf(out_path, rule.gguf_arch, keys, vocab, plan, dtype, model_dir, metadata, progress)
    except BaseException:
        out_path.unlink(missing_ok=True)  # never leave a half-written file behind
        raise

    return {
        "tensors": len(plan),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "vocab_size": hp.vocab_size,
        "parameters": sum(_count(t.shape) for t in plan),
        "architecture": hf_arch,
        "gguf_architecture": rule.gguf_arch,
        "dtype": dtype,
        "file_type": _FILE_TYPES[dtype],
        "tokenizer": vocab.model,
        "tokenizer_pre": vocab.pre,
        "largest_tensor_bytes": max(t.out_nbytes for t in plan),
    }


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
        files = sorted(set(read_json(index)["weight_map"].values()))
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


_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _plan_tensors(sources: dict[str, _Source], hp: HParams, rule: ArchRule, dtype: str) -> list[_Tensor]:
    """Map every HF tensor to its GGUF name, dtype and transform, in llama.cpp's usual order."""
    plan: list[_Tensor] = []
    unknown: list[str] = []
    for hf_name, source in sources.items():
        if rule.ignored.search(hf_name):
            continue
        if hf_name == "lm_head.weight" and (hp.tied_embeddings or not rule.untied_head):
            if not hp.tied_embeddings:
                raise UnsupportedModel(f"llama.cpp's {rule.gguf_arch} always ties the output to the embeddings; "
                                       "this checkpoint has a separate lm_head")
            continue
        gguf_name = arch.gguf_name(hf_name, rule)
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        if source.dtype not in _FLOAT_DTYPES:
            raise UnsupportedModel(f"tensor {hf_name} has dtype {source.dtype}; only float checkpoints are converted")
        shift = rule.norm_shift if hf_name.endswith("norm.weight") else 0.0
        plan.append(_Tensor(gguf_name, hf_name, source.path, source.shape, source.dtype,
                            _out_dtype(gguf_name, source.shape, dtype), _permute_heads(gguf_name, hp, rule), shift))
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise UnsupportedModel(
            f"GGUF export does not know {len(unknown)} tensor(s), e.g. {shown}", tensors=sorted(unknown)
        )
    arch.check_plan({t.gguf_name: t.shape for t in plan}, hp, rule)
    return sorted(plan, key=_tensor_order)


def _out_dtype(gguf_name: str, shape: tuple[int, ...], dtype: str) -> str:
    if len(shape) < 2 or gguf_name in arch.F32_TENSORS:
        return "f32"
    if dtype == "q8_0" and shape[-1] % _QUANTIZED["q8_0"][0]:
        return "f16"
    return dtype


def _permute_heads(gguf_name: str, hp: HParams, rule: ArchRule) -> int:
    if not rule.permute_qk:
        return 0
    if ".attn_q." in gguf_name:
        return hp.n_heads
    if ".attn_k." in gguf_name:
        return hp.n_kv_heads
    return 0


def _tensor_order(tensor: _Tensor) -> tuple[int, int, str]:
    name = tensor.gguf_name
    if name.startswith(("token_embd", "token_types", "position_embd")):
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
    keys: list[tuple[Any, ...]],
    vocab: Vocab,
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

    raw_types = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    writer = gguf.GGUFWriter(str(out_path), gguf_arch)
    try:
        _add_general(writer, model_dir, dtype, gguf_arch, metadata)
        for method, *arguments in keys:
            getattr(writer, method)(*arguments)
        add_to_writer(writer, vocab)
        for tensor in plan:
            np_dtype = np.dtype(np.float16 if tensor.out_dtype == "f16" else np.float32)
            writer.add_tensor_info(tensor.gguf_name, tensor.shape, np_dtype, tensor.out_nbytes,
                                   raw_dtype=raw_types.get(tensor.out_dtype))
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


_PHI3_NAMES = ("phi3", "phi-3")
_PHI3_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _check_name(name: str, vocab: Vocab) -> None:
    """llama.cpp sets Phi-3's token attributes for any model whose general.name contains "phi3"
    and fails to load one whose vocab lacks those tokens: refuse that file before writing it."""
    if not any(key in name.lower() for key in _PHI3_NAMES):
        return
    missing = [token for token in _PHI3_TOKENS if token not in vocab.tokens]
    if missing:
        raise UnsupportedModel(f"llama.cpp would fail to load a model named {name!r} without the Phi-3 tokens "
                               f"{', '.join(missing)}; give it another general.name (metadata)", name=name)


def _add_general(writer: Any, model_dir: Path, dtype: str, gguf_arch: str, metadata: dict[str, str] | None) -> None:
    strings = {"general.type": "model", "general.name": model_dir.name}
    for key, value in (metadata or {}).items():
        if key.startswith(("tokenizer.", f"{gguf_arch}.")) or key in ("general.architecture", "general.file_type"):
            raise ValueError(f"metadata key {key!r} would override a structural GGUF key")
        strings[key] = str(value)
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.add_quantization_version(2)  # gguf.GGML_QUANT_VERSION, as llama.cpp's tools write it
    writer.add_file_type(_FILE_TYPES[dtype])


_CHUNK_BYTES = 16 << 20  # source bytes read at a time: bounds memory beyond the output tensor


def _load_tensor(tensor: _Tensor) -> Any:
    """The tensor's bytes as written: read in row chunks, transformed (rope reorder, shift),
    encoded into one preallocated output array, so memory is that array plus one chunk."""
    import numpy as np

    rows = tensor.shape[0]
    if tensor.out_dtype in _QUANTIZED:
        out = np.empty((rows, tensor.out_nbytes // rows), dtype=np.uint8)
    else:
        out = np.empty(tensor.shape, dtype=np.float16 if tensor.out_dtype == "f16" else np.float32)
    row_bytes = _count(tensor.shape[1:]) * _ITEM_SIZES[tensor.source_dtype]
    step = max(1, _CHUNK_BYTES // row_bytes)
    head_rows = rows // tensor.permute_heads if tensor.permute_heads else 1
    step = max(head_rows, step // head_rows * head_rows)  # permutation works on whole heads
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = _read_rows(tensor, start, stop)
        if tensor.permute_heads:
            part = _permute_for_rope(part, (stop - start) // head_rows)
        if tensor.shift:
            part = part.astype(np.float32) + np.float32(tensor.shift)  # in float32, as HF computes 1 + w
        out[start:stop] = _encode(part, tensor.out_dtype)
    return out


def _encode(part: Any, out_dtype: str) -> Any:
    """Rows in the output type. float64 goes through float32 first, as in llama.cpp's converter."""
    import gguf
    import numpy as np

    if part.dtype == np.float64:
        part = part.astype(np.float32)
    if out_dtype == "q8_0":
        return gguf.quants.quantize(part, gguf.GGMLQuantizationType.Q8_0)
    if out_dtype == "bf16":
        return gguf.quants.quantize(part.astype(np.float32, copy=False), gguf.GGMLQuantizationType.BF16)
    return part  # f32/f16: numpy casts on assignment, as the converter's astype does


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
