"""Fold PEFT LoRA/DoRA adapters, each with a weight, into a base model: a new Hugging Face directory.

peft's merge_and_unload needs the whole model in memory and save_pretrained then serialises it
again; here the base's checkpoint is streamed one tensor at a time: read it, add the adapters'
deltas in float32, cast, and write it straight into its place in the output shard, whose header
is written first (every output shape and dtype is known from the base's headers). Memory is
about one tensor, never the model, and the output is complete only when the caller renames it.

The arithmetic is peft's own (peft/tuners/lora/layer.py and variants.py, 0.21), in adapter order:
- LoRA: W += transpose(B @ A, fan_in_fan_out) * scale, scale = weight * alpha / r (alpha /
  sqrt(r) with use_rslora; alpha and r from alpha_pattern / rank_pattern), as set_scale does.
- Embedding LoRA: W += (B @ A).T * scale.
- DoRA: W = m / ||W0 + delta||_row * (W + delta), the norm taken on the unmerged base weight W0
  (peft's _unmerged_base_weight), so merging several adapters equals running them unmerged.
A base of one float dtype is computed in float32 (float64 stays float64) and cast once to the
output dtype; peft rounds each adapter's delta to the base dtype first, so in float16/bfloat16
this is the more exact of the two.

Refused (UnsupportedModel, kind unsupported_model, naming the option): what runtimes.peft_adapter
refuses for every caller, plus modules_to_save, LoRA biases, DoRA on embeddings, magnitude vectors
without use_dora, adapters on embeddings a tied base shares with its output layer (a merged tied
model would change both), and quantized bases. An adapter made for another model (shapes, a module the base
lacks, a different Hugging Face id as base_model_name_or_path) is AdapterMismatch (adapter_mismatch).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import ProgressFn, UnsupportedModel
from runtimes.peft_adapter import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    AdapterMismatch,
    Pair,
    adapter_weights,
    check_shapes,
    module_scale,
    pair_tensors,
    read_adapter_config,
    same_values,
)

SHARD_BYTES = 2 * 10**9  # as Hugging Face counts "2GB": a bigger model is split, with an index
DTYPES = ("auto", "f32", "f16", "bf16")
_ACTION = "merge this adapter"
_REFUSED = {
    "modules_to_save": "modules_to_save (whole replacement modules) are not merged; train without them, or "
                       "apply the adapter unmerged (generate's `adapters`)",
    "lora_bias": "LoRA biases (lora_bias=true) are not merged",
}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_FLOATS = {"F64", "F32", "F16", "BF16"}
# What is not copied from the base directory: its weights (rewritten) and the registry's manifest.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".pkl")
_SKIPPED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "manifest.json"}
_HF_CACHE_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class _Delta:
    """One adapter's change to one base tensor."""

    adapter: Path
    pair: Pair
    scale: float
    fan_in_fan_out: bool
    dora: bool


@dataclass
class _Source:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


@dataclass
class _Checkpoint:
    """The base's tensors, read one at a time (safetensors; pickle only when allowed)."""

    tensors: dict[str, _Source] = field(default_factory=dict)
    pickle: bool = False

    def read(self, name: str) -> Any:
        source = self.tensors[name]
        if self.pickle:
            import torch

            return torch.load(source.file, map_location="cpu", weights_only=True, mmap=True)[name].contiguous()
        return _read_safetensor(source.file, name)


# --------------------------------------------------------------------------------------------
# Public entry point


def merge_adapters(base_dir: Path, adapters: list[tuple[Path, float]], out_dir: Path, *, dtype: str = "auto",
                   progress: ProgressFn | None = None, cancelled: Callable[[], bool] | Any = None,
                   allow_pickle: bool = False, max_shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Write base_dir with `adapters` ([(adapter_dir, weight)], applied in order) folded in, as a
    complete Hugging Face model directory in out_dir (created if missing; the caller makes it
    atomic and removes it on failure): safetensors (sharded past max_shard_bytes, with an index),
    config.json (its dtype updated), tokenizer files, chat template and generation_config copied.

    dtype: "auto" keeps each tensor's stored dtype, "f32" / "f16" / "bf16" casts every float tensor.
    progress(done, total, message) after each tensor; cancelled: a callable (ctx.cancelled.is_set) or
    a threading.Event, true when the job should stop, checked before each tensor: it raises
    protocol.errors.Cancelled.
    Raises UnsupportedModel (what cannot be merged faithfully, or a pickle checkpoint without
    allow_pickle) and AdapterMismatch (an adapter made for another base) before writing anything.
    Returns stats: tensors, merged_tensors, bytes (of the weights), seconds, shards, dtype.
    """
    from runtimes.hf.lm import check_model_dir

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not adapters:
        raise ValueError("merge_adapters needs at least one adapter")
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = check_model_dir(base_dir, allow_pickle)
    checkpoint = _open_checkpoint(base_dir)
    deltas = _plan(base_dir, config, checkpoint, [(Path(a), float(w)) for a, w in adapters])
    entries = [(name, _out_dtype(source.dtype, dtype), source.shape) for name, source in checkpoint.tensors.items()]
    shards = _plan_shards(entries, max_shard_bytes)
    stop = getattr(cancelled, "is_set", cancelled)

    out_dir.mkdir(parents=True, exist_ok=True)
    done, total, written = 0, len(entries), 0
    for file_name, shard in shards.items():
        with _ShardWriter(out_dir / file_name, shard) as writer:
            for name, out_dtype, _shape in shard:
                if stop is not None and stop():
                    from protocol.errors import Cancelled

                    raise Cancelled({"stage": "merge", "tensors_done": done, "tensors": total})
                tensor = checkpoint.read(name)
                if name in deltas:
                    tensor = _apply(tensor, deltas[name])
                written += writer.write(name, tensor.to(_torch_dtype(out_dtype)))
                del tensor
                done += 1
                if progress is not None:
                    what = f"merged {len(deltas[name])} adapter(s) into" if name in deltas else "copied"
                    progress(done, total, f"{what} {name}")
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, shard in shards.items() for name, _, _ in shard}
        _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": written}, "weight_map": weight_map})
    stored = _stored_dtype(entries)
    _copy_side_files(base_dir, out_dir, config, dtype)
    return {"tensors": total, "merged_tensors": len(deltas), "bytes": written, "shards": len(shards),
            "dtype": stored, "adapters": len(adapters), "seconds": round(time.perf_counter() - started, 3)}


# --------------------------------------------------------------------------------------------
# Planning: every adapter checked against the base before anything is written


def _plan(base_dir: Path, config: dict[str, Any], checkpoint: _Checkpoint,
          adapters: Sequence[tuple[Path, float]]) -> dict[str, list[_Delta]]:
    """Base tensor name -> the deltas to apply to it, in adapter order."""
    if config.get("quantization_config"):
        method = (config["quantization_config"] or {}).get("quant_method", "quantized")
        raise UnsupportedModel(f"cannot merge into {base_dir}: its weights are quantized ({method}); merge into the "
                               "unquantized model, then quantize the result", path=str(base_dir), option="quantization_config")
    tied = bool(config.get("tie_word_embeddings", True))
    deltas: dict[str, list[_Delta]] = {}
    for adapter_dir, weight in adapters:
        lora = read_adapter_config(adapter_dir, action=_ACTION, refused=_REFUSED)
        _check_base_name(lora, base_dir, adapter_dir)
        weights = adapter_weights(adapter_dir)
        _check_base_copies(weights, adapter_dir, checkpoint, base_dir)
        dora = bool(lora.get("use_dora"))
        for pair in pair_tensors(weights, action=_ACTION):
            target = pair.module + ".weight"
            if tied and (pair.embedding or pair.module.split(".")[-1] == "lm_head"):
                raise UnsupportedModel(
                    f"cannot {_ACTION}: it changes {pair.module}, and the base ties its input and output embeddings "
                    "(tie_word_embeddings), so a merged model would change both; apply it unmerged instead",
                    module=pair.module, adapter=str(adapter_dir))
            if target not in checkpoint.tensors:
                raise AdapterMismatch(
                    f"adapter {adapter_dir} changes {pair.module}, which model {base_dir} does not have: is the "
                    "adapter for a different base model?", module=pair.module, adapter=str(adapter_dir), model=str(base_dir))
            if pair.m_key is not None and (not dora or pair.embedding):
                what = "DoRA on an embedding layer" if dora else "DoRA magnitude vectors, but use_dora is false"
                raise UnsupportedModel(f"cannot {_ACTION}: {what} ({pair.module})", module=pair.module, option="use_dora")
            fan_in_fan_out = bool(lora.get("fan_in_fan_out")) and not pair.embedding
            check_shapes(pair, checkpoint.tensors[target].shape, fan_in_fan_out=fan_in_fan_out, adapter=adapter_dir,
                         model=base_dir)
            scale = module_scale(lora, pair, weight)
            deltas.setdefault(target, []).append(_Delta(adapter_dir, pair, scale, fan_in_fan_out, pair.m_key is not None))
    return deltas


def _hf_id(reference: str) -> str | None:
    """The Hugging Face id a path or a name stands for: org/name, or a path inside the HF cache."""
    for part in Path(reference).parts:
        match = _HF_CACHE_DIR.match(part)
        if match:
            return f"{match['org']}/{match['name']}"
    return reference if _HF_ID.match(reference) else None


def _check_base_name(lora: dict[str, Any], base_dir: Path, adapter_dir: Path) -> None:
    """Shapes cannot tell a base from its instruct tune; the Hugging Face ids can, where both are known."""
    named = str(lora.get("base_model_name_or_path") or "")
    theirs, ours = _hf_id(named) if named else None, _hf_id(str(base_dir))
    if theirs and ours and theirs.lower() != ours.lower():
        raise AdapterMismatch(f"adapter {adapter_dir} was trained on {theirs}, but the model is {ours} ({base_dir})",
                              adapter=str(adapter_dir), model=str(base_dir), adapter_base=theirs, model_id=ours)


def _check_base_copies(weights: dict[str, Any], adapter_dir: Path, checkpoint: _Checkpoint, base_dir: Path) -> None:
    """peft saves the frozen embedding weights beside an adapter on them, and loads them over the
    base's: a copy that differs (new tokens trained, a resized vocabulary) means another base."""
    for key, stored in weights.items():
        if not key.endswith(".base_layer.weight"):
            continue
        name = key.removeprefix(PEFT_PREFIX)[: -len(".base_layer.weight")] + ".weight"
        source = checkpoint.tensors.get(name)
        if source is None or source.shape != stored.shape or not same_values(
                _read_safetensor(adapter_dir / ADAPTER_WEIGHTS, key).float().numpy(),
                checkpoint.read(name).float().numpy(), stored.dtype, source.dtype):
            raise AdapterMismatch(f"adapter {adapter_dir} carries its own {name}, which differs from model {base_dir}'s "
                                  "(new tokens or a resized vocabulary?): it belongs to another base",
                                  tensor=key, adapter=str(adapter_dir), model=str(base_dir))


# --------------------------------------------------------------------------------------------
# The arithmetic


def _apply(weight: Any, deltas: list[_Delta]) -> Any:
    """peft's merge of each delta in turn (see the module docstring), in float32 (float64 stays)."""
    import torch

    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merged = weight.to(work, copy=True)
    unmerged = merged.clone() if any(d.dora for d in deltas) else None
    for delta in deltas:
        pair = delta.pair
        a = _read_safetensor(delta.adapter / ADAPTER_WEIGHTS, pair.a_key).to(work)
        b = _read_safetensor(delta.adapter / ADAPTER_WEIGHTS, pair.b_key).to(work)
        change = _transpose(b @ a, delta.fan_in_fan_out or pair.embedding) * delta.scale
        if not delta.dora:
            merged += change
            continue
        magnitude = _read_safetensor(delta.adapter / ADAPTER_WEIGHTS, pair.m_key).to(work)
        norm = torch.linalg.norm(_transpose(unmerged, delta.fan_in_fan_out) + _transpose(change, delta.fan_in_fan_out),
                                 dim=1).to(work)
        factor = _transpose((magnitude / norm).view(-1, 1), delta.fan_in_fan_out)
        merged = factor * (merged + change)
    return merged


def _transpose(tensor: Any, yes: bool) -> Any:
    return tensor.T if yes else tensor


# --------------------------------------------------------------------------------------------
# Reading the base


def _open_checkpoint(base_dir: Path) -> _Checkpoint:
    """Every tensor's file, shape and dtype, from headers only; safetensors when there are any."""
    from safetensors import safe_open

    checkpoint = _Checkpoint()
    files = _weight_files(base_dir, "model.safetensors.index.json", "*.safetensors")
    if files:
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    checkpoint.tensors[key] = _Source(path, tuple(piece.get_shape()), str(piece.get_dtype()))
    else:  # check_model_dir let a pickle checkpoint through: allow_pickle was given
        import torch

        checkpoint.pickle = True
        for path in _weight_files(base_dir, "pytorch_model.bin.index.json", "*.bin"):
            for key, tensor in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
                name = next((k for k, v in _ST_DTYPES.items() if v == str(tensor.dtype).removeprefix("torch.")), None)
                if name is None:
                    raise UnsupportedModel(f"{path}: tensor {key} has dtype {tensor.dtype}, which safetensors cannot hold")
                checkpoint.tensors[key] = _Source(path, tuple(tensor.shape), name)
    for name, source in checkpoint.tensors.items():
        if source.dtype not in _ST_DTYPES:
            raise UnsupportedModel(f"{base_dir}: tensor {name} has dtype {source.dtype}, which is not merged "
                                   "(quantized checkpoints are not supported)", tensor=name)
    if not checkpoint.tensors:
        raise UnsupportedModel(f"{base_dir} holds no weights", path=str(base_dir))
    return checkpoint


def _weight_files(base_dir: Path, index: str, pattern: str) -> list[Path]:
    if (base_dir / index).is_file():
        names = json.loads((base_dir / index).read_text(encoding="utf-8"))["weight_map"].values()
        return [base_dir / name for name in sorted(set(names))]
    return sorted(base_dir.glob(pattern))


def _read_safetensor(path: Path, name: str) -> Any:
    """One tensor, opening the file for it alone: closing unmaps the pages read, so a large
    checkpoint's pages never pile up in resident memory."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


# --------------------------------------------------------------------------------------------
# Writing


def _out_dtype(stored: str, dtype: str) -> str:
    return _NAMES[dtype] if dtype != "auto" and stored in _FLOATS else stored


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _ST_DTYPES[name])


_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * _ITEM_BYTES[dtype]


def _plan_shards(entries: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> dict[str, list]:
    """File name -> its tensors, filled in order up to max_bytes each (a bigger tensor gets its own)."""
    groups: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups, start=1)}


class _ShardWriter:
    """A safetensors file written as its tensors arrive: the header first (every dtype and shape is
    known in advance), then each tensor's bytes at its offset, so only one tensor is ever in memory."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self._header = header
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # as safetensors pads it: tensor data starts 8-byte aligned
        self._file = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._order = iter(entries)

    def write(self, name: str, tensor: Any) -> int:
        expected, dtype, shape = next(self._order)
        if name != expected or tuple(tensor.shape) != shape or _ST_DTYPES[dtype] != str(tensor.dtype).removeprefix("torch."):
            raise RuntimeError(f"shard writer: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected} {shape} {dtype}")
        import torch

        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        return data.nbytes

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _stored_dtype(entries: list[tuple[str, str, tuple[int, ...]]]) -> str:
    """The float dtype of the weights written, by bytes ("f32", "f16", "bf16"; f64 as "f64")."""
    sizes: dict[str, int] = {}
    for _, dtype, shape in entries:
        if dtype in _FLOATS:
            sizes[dtype] = sizes.get(dtype, 0) + _nbytes(dtype, shape)
    return max(sizes, key=sizes.__getitem__).lower() if sizes else "f32"


def _copy_side_files(base_dir: Path, out_dir: Path, config: dict[str, Any], dtype: str) -> None:
    """Everything at the top of the base directory but its weights: config, generation config,
    tokenizer files, chat template, README. config.json records a new dtype when one was asked."""
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if name.startswith(".") or name in _SKIPPED or name.endswith(_WEIGHT_SUFFIXES) or not path.is_file():
            continue
        if name == "config.json" and dtype != "auto":
            torch_name = _ST_DTYPES[_NAMES[dtype]]
            updated = {**config, "torch_dtype": torch_name, **({"dtype": torch_name} if "dtype" in config else {})}
            _write_json(out_dir / name, updated)
        else:
            shutil.copyfile(path, out_dir / name)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
