"""PEFT LoRA adapter -> GGUF LoRA adapter that llama.cpp applies, unmerged, to the base model's GGUF.

The GGUF of the base comes from runtimes/gguf/export.py; this writes the adapter beside it, so a
host can ship one base GGUF and many small adapters (llama.cpp's `--lora`, llama-cpp-python's
`Llama(lora_path=..., lora_scale=...)`). llama.cpp's own convert_lora_to_gguf.py is, like its
model converter, a script inside its source tree; this is our narrow piece instead, sharing the
tensor naming and Q/K permutation of gguf_export so adapter and base always agree.
tests/test_gguf_lora.py holds it to llama.cpp: base + adapter in llama.cpp gives the same greedy
tokens as transformers with the adapter merged by peft, at scale 1 and at other scales.

What llama.cpp reads (src/llama-adapter.cpp, llama-graph.cpp), re-derived here:
- Header: general.architecture equal to the base's, general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha (float32). No hyper-parameters, no vocabulary.
- Tensors come in pairs named after the base tensor: `blk.N.attn_q.weight.lora_a` / `.lora_b`.
  For a linear layer (PEFT lora_A [r, in], lora_B [out, r]) both are written as PEFT stores
  them, which in GGUF's reversed dimension order is lora_a ne = [in, r] and lora_b ne = [r, out];
  llama.cpp computes y += scale * B (A x) with scale = lora_scale * alpha / rank, where rank is
  lora_b's ne[0], i.e. per tensor, and no alpha/rank division at all when alpha is 0.
- Token embeddings are the exception: llama.cpp gathers rows of lora_a, so it must be
  [vocab, r] (PEFT's lora_embedding_A [r, vocab] transposed); lora_b is PEFT's
  lora_embedding_B [hidden, r] as stored.
- Q/K: the base rows were permuted for llama.cpp's rope (gguf_export._permute_for_rope), and
  delta = B A must be permuted the same way: the rows of lora_b are, lora_a is untouched.
  Architectures written unpermuted (Qwen2) leave lora_b unpermuted too.

Scaling: PEFT's scale per module is alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora), with
alpha_m and r_m from alpha_pattern / rank_pattern. llama.cpp has one alpha per file and divides
by each tensor's own rank, so rank_pattern alone needs nothing; where the module's PEFT scale
differs from alpha_file / r_m (rslora with mixed ranks, alpha_pattern), the ratio is folded into
lora_b, exactly, so `lora_scale` keeps PEFT's meaning (multiplier of the configured scale).

Refused with UnsupportedModel (a file that loads but answers differently is worse than none):
DoRA and the other LoRA variants peft runs with extra forward logic (aLoRA, VeLoRA, MoNTE-CLoRA,
MiCA, Arrow, BD-LoRA, KaSA, QA-LoRA), modules_to_save and trainable tokens (whole replacement
tensors, which a llama.cpp adapter cannot carry), LoRA biases, target_parameters, layer
replication, initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA:
such an adapter needs its residual base), embedding/lm_head adapters on a model with tied
embeddings (llama.cpp would apply the embedding adapter to its output projection), any module
without a llama.cpp tensor, and pickle (adapter_model.bin) checkpoints.

Heavy imports (numpy, safetensors, gguf) happen inside the functions, so importing this is cheap.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel
from runtimes.gguf.export import (
    _FILE_TYPES,
    _architecture,
    _count,
    _gguf_name,
    _hparams,
    _load_tensor,
    _permute_heads,
    _read_json,
    _scan_weights,
    _Tensor,
)

ProgressFn = Callable[[int, int, str], None]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Config keys that switch on behaviour a llama.cpp LoRA adapter cannot express. Any truthy value
# is refused; the message names the feature.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora=true): llama.cpp adapters have no magnitude vector; merge the adapter "
                "into the base (merge_lora) and export that instead",
    "modules_to_save": "modules_to_save (whole replacement modules): llama.cpp adapters carry only LoRA pairs; "
                       "merge the adapter into the base and export that instead",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) replace embedding rows, which a "
                               "llama.cpp adapter cannot carry",
    "lora_bias": "LoRA biases (lora_bias=true): llama.cpp adapters have no bias term",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not converted yet",
    "velora_config": "the VeLoRA variant (velora_config)",
    "monteclora_config": "the MoNTE-CLoRA variant (monteclora_config)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "arrow_config": "the Arrow variant (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "kasa_config": "the KaSA variant (kasa_config)",
    "layer_replication": "layer_replication (the adapter expects duplicated base layers)",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts)",
}
# init_lora_weights values that leave the base weights as they are (the rest rewrite them).
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.[^.]+)?$")
_PEFT_PREFIX = "base_model.model."


@dataclass
class _Pair:
    """One adapted module: its lora_A / lora_B tensors and everything needed to write them."""

    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    embedding: bool
    a_key: str | None = None
    b_key: str | None = None
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()
    a_dtype: str = ""
    b_dtype: str = ""
    gguf_base: str = ""  # e.g. blk.0.attn_q.weight
    rank: int = 0
    permute_heads: int = 0
    fold: float = 1.0  # multiplies lora_b so llama.cpp's alpha/rank gives PEFT's scale
    peft_scale: float = 0.0


@dataclass
class _Plan:
    gguf_arch: str
    alpha: float
    pairs: list[_Pair] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Public entry point


def convert_lora_to_gguf(
    adapter_dir: Path,
    base_dir: Path,
    out_path: Path,
    *,
    dtype: str = "f32",
    progress: ProgressFn | None = None,
) -> dict:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) -> a GGUF LoRA adapter
    file that llama.cpp applies to the GGUF of base_dir (as written by gguf_export.convert_to_gguf).

    Exactly out_path is written (removed again if conversion fails); the caller handles atomic
    placement. dtype: 'f32' or 'f16' for the lora tensors. base_dir needs config.json and the
    safetensors weights (their headers are read, to check every shape against the base; data only
    to compare the frozen embedding copies peft saves beside embedding/lm_head adapters).
    Returns stats: tensors, modules, bytes, seconds, alpha, ranks, targets, folded_modules, ...
    Raises UnsupportedModel for what a llama.cpp adapter cannot express (see the module docstring).
    """
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    started = time.perf_counter()
    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    lora_config = _read_adapter_config(adapter_dir)
    weights = _adapter_weights(adapter_dir)
    plan = _plan(lora_config, weights, base_dir, adapter_dir / ADAPTER_WEIGHTS)

    try:
        _write(out_path, plan, dtype, adapter_dir, progress)
    except BaseException:
        out_path.unlink(missing_ok=True)  # never leave a half-written file behind
        raise

    targets = sorted({p.gguf_base.split(".")[-2] if p.gguf_base.startswith("blk.") else p.gguf_base.split(".")[0]
                      for p in plan.pairs})
    return {
        "tensors": 2 * len(plan.pairs),
        "modules": len(plan.pairs),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "gguf_architecture": plan.gguf_arch,
        "dtype": dtype,
        "alpha": plan.alpha,
        "ranks": sorted({p.rank for p in plan.pairs}),
        "targets": targets,
        "use_rslora": bool(lora_config.get("use_rslora")),
        "folded_modules": sum(1 for p in plan.pairs if p.fold != 1.0),
        "parameters": sum(_count(p.a_shape) + _count(p.b_shape) for p in plan.pairs),
    }


# --------------------------------------------------------------------------------------------
# Reading and validating the adapter


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UnsupportedModel(f"{adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = _read_json(path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedModel(f"only LoRA adapters convert to GGUF, not peft_type {peft_type}", peft_type=peft_type)
    for key, what in _REFUSED_OPTIONS.items():
        if config.get(key):
            raise UnsupportedModel(f"cannot convert this adapter to a GGUF LoRA: {what}", option=key)
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise UnsupportedModel(
            f"cannot convert an adapter initialised with init_lora_weights={init!r} to a GGUF LoRA: it belongs to "
            "a base whose weights that initialisation changed (save it with peft's conversion to plain LoRA, "
            "or merge it and export the merged model)",
            option="init_lora_weights",
        )
    return config


@dataclass(frozen=True)
class _Stored:
    shape: tuple[int, ...]
    dtype: str


def _adapter_weights(adapter_dir: Path) -> dict[str, _Stored]:
    """Tensor names, shapes and dtypes of adapter_model.safetensors, from its header only."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UnsupportedModel(f"{adapter_dir} holds a pickle adapter (adapter_model.bin); only safetensors "
                                   "adapters are converted")
        raise UnsupportedModel(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return {name: _Stored(tuple(info["shape"]), info["dtype"]) for name, info in header.items()}


def _plan(config: dict[str, Any], weights: dict[str, _Stored], base_dir: Path, adapter_file: Path) -> _Plan:
    base_config = _read_json(base_dir / "config.json")
    hf_arch, rule = _architecture(base_config)
    hp = _hparams(base_config, hf_arch)
    sources = _scan_weights(base_dir)
    base_shapes = {name: source.shape for name, source in sources.items()}

    pairs = _pair_tensors(weights)
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    # One alpha for the file. Without rslora that is PEFT's own; with rslora (scale alpha/sqrt(r))
    # alpha*sqrt(r) makes llama.cpp's alpha/r equal for the configured rank, so nothing is folded
    # unless a module's rank or alpha differs from the defaults.
    file_alpha = alpha_default * math.sqrt(r_default) if rslora else alpha_default

    unsupported: list[str] = []
    for pair in pairs:
        hf_weight = pair.module + ".weight"
        if hf_weight in ("lm_head.weight", "model.embed_tokens.weight") and hp.tied_embeddings:
            raise UnsupportedModel(
                f"the adapter targets {pair.module}, but the base ties its input and output embeddings: llama.cpp "
                "runs both from token_embd and would apply the adapter to both; merge the adapter and export that",
                module=pair.module,
            )
        gguf_base = _gguf_name(hf_weight)
        if gguf_base is None or hf_weight not in base_shapes or len(base_shapes[hf_weight]) != 2:
            unsupported.append(pair.module)
            continue
        pair.gguf_base = gguf_base
        _check_shapes(pair, base_shapes[hf_weight])
        expected_rank = int(rank_pattern.get(_pattern_key(rank_pattern, pair.module), r_default))
        if pair.rank != expected_rank:
            raise UnsupportedModel(
                f"{pair.module} has rank {pair.rank} in the weights but {expected_rank} in adapter_config.json",
                module=pair.module,
            )
        alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, pair.module), alpha_default))
        pair.peft_scale = alpha / (math.sqrt(pair.rank) if rslora else pair.rank)
        llama_scale = file_alpha / pair.rank if file_alpha else 1.0  # llama.cpp: no division when alpha is 0
        pair.fold = 1.0 if math.isclose(pair.peft_scale, llama_scale, rel_tol=1e-7) else pair.peft_scale / llama_scale
        pair.permute_heads = 0 if pair.embedding else _permute_heads(gguf_base, hp, rule)
    if unsupported:
        shown = ", ".join(sorted(unsupported)[:5])
        raise UnsupportedModel(
            f"the adapter targets {len(unsupported)} module(s) that have no llama.cpp tensor in this {hf_arch} "
            f"base, e.g. {shown}; supported: q/k/v/o_proj, gate/up/down_proj, embed_tokens and lm_head "
            "(untied embeddings only)",
            modules=sorted(unsupported),
        )
    _check_base_copies(weights, adapter_file, sources)
    return _Plan(rule.gguf_arch, file_alpha, sorted(pairs, key=_pair_order))


def _pair_tensors(weights: dict[str, _Stored]) -> list[_Pair]:
    """Group lora_A/lora_B (or lora_embedding_A/B) by module; refuse anything else in the file."""
    pairs: dict[str, _Pair] = {}
    others: list[str] = []
    for key, stored in weights.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if name.endswith(".base_layer.weight"):
            continue  # peft's copy of a frozen base embedding: checked against the base in _check_base_copies
        match = _LINEAR_KEY.match(name) or _EMBED_KEY.match(name)
        if match is None:
            others.append(key)
            continue
        embedding = match.re is _EMBED_KEY
        pair = pairs.setdefault(match["module"], _Pair(match["module"], embedding))
        if pair.embedding != embedding:
            raise UnsupportedModel(f"{match['module']} mixes linear and embedding LoRA tensors")
        if len(stored.shape) != 2:
            raise UnsupportedModel(f"adapter tensor {key} has shape {list(stored.shape)}; only 2-D LoRA factors are "
                                   "converted (no convolution LoRA)")
        if match["which"] == "A":
            pair.a_key, pair.a_shape, pair.a_dtype = key, stored.shape, stored.dtype
        else:
            pair.b_key, pair.b_shape, pair.b_dtype = key, stored.shape, stored.dtype
    if others:
        raise UnsupportedModel(_describe_extra_tensors(others), tensors=sorted(others))
    incomplete = [p.module for p in pairs.values() if p.a_key is None or p.b_key is None]
    if incomplete:
        raise UnsupportedModel(f"the adapter lacks lora_A or lora_B for {len(incomplete)} module(s), "
                               f"e.g. {sorted(incomplete)[0]}")
    if not pairs:
        raise UnsupportedModel("the adapter holds no LoRA tensors")
    for pair in pairs.values():
        for key, dtype in ((pair.a_key, pair.a_dtype), (pair.b_key, pair.b_dtype)):
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise UnsupportedModel(f"adapter tensor {key} has dtype {dtype}; only float adapters are converted")
    return list(pairs.values())


_ROUNDING = {"BF16": 2.0**-8 * 1.01, "F16": 2.0**-11 * 1.01, "F32": 0.0, "F64": 0.0}  # half an ulp, relative


def _check_base_copies(weights: dict[str, _Stored], adapter_file: Path, sources: dict[str, Any]) -> None:
    """peft saves the frozen embedding / lm_head weights beside an adapter that targets them
    (save_embedding_layers), since a vocabulary resized for training changes them. The GGUF adapter
    runs on the original base, so each copy must equal the base's tensor: otherwise refuse."""
    import numpy as np

    copies = {key: stored for key, stored in weights.items() if key.endswith(".base_layer.weight")}
    if not copies:
        return
    for key, stored in copies.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        hf_name = name[: -len(".base_layer.weight")] + ".weight"
        if hf_name not in sources or sources[hf_name].shape != stored.shape:
            raise UnsupportedModel(
                f"the adapter carries its own {hf_name} of shape {list(stored.shape)} (a resized vocabulary?), which "
                "differs from the base's; a GGUF LoRA runs on the base's weights: merge the adapter and export that",
                tensor=key,
            )
        source = sources[hf_name]
        ours = _load_tensor(_Tensor(hf_name, key, adapter_file, stored.shape, stored.dtype, "f32"))
        theirs = _load_tensor(_Tensor(hf_name, hf_name, source.path, source.shape, source.dtype, "f32"))
        # Exact when both have the same dtype; a copy saved in a narrower float than the base
        # (model loaded in bf16 for training) is compared within that float's rounding.
        coarser = max((stored.dtype, source.dtype), key=lambda d: _ROUNDING.get(d, 0.0))
        if not np.allclose(ours, theirs, rtol=_ROUNDING.get(coarser, 0.0), atol=1e-7 if coarser == "F16" else 0.0):
            raise UnsupportedModel(
                f"the adapter carries its own {hf_name} whose values differ from the base's (new tokens trained?); "
                "a GGUF LoRA runs on the base's weights: merge the adapter and export that",
                tensor=key,
            )


def _describe_extra_tensors(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    if any("lora_magnitude_vector" in n for n in names):
        return f"cannot convert a DoRA adapter to a GGUF LoRA (magnitude vectors such as {shown})"
    if any("modules_to_save" in n or n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in names):
        return f"cannot convert an adapter with fully trained modules (modules_to_save: {shown}) to a GGUF LoRA"
    if any("trainable_tokens" in n for n in names):
        return f"cannot convert an adapter with trainable tokens ({shown}) to a GGUF LoRA"
    if any(n.endswith(".bias") for n in names):
        return f"cannot convert an adapter that trains biases ({shown}) to a GGUF LoRA"
    return f"the adapter holds {len(names)} tensor(s) that are not LoRA factors, e.g. {shown}"


def _check_shapes(pair: _Pair, base_shape: tuple[int, ...]) -> None:
    """PEFT stores lora_A [r, in] and lora_B [out, r] for a linear [out, in], and
    lora_embedding_A [r, vocab], lora_embedding_B [hidden, r] for an embedding [vocab, hidden]."""
    rank = pair.a_shape[0]
    if pair.embedding:
        expected_a, expected_b = (rank, base_shape[0]), (base_shape[1], rank)
    else:
        expected_a, expected_b = (rank, base_shape[1]), (base_shape[0], rank)
    if pair.a_shape != expected_a or pair.b_shape != expected_b:
        raise UnsupportedModel(
            f"{pair.module}: LoRA shapes {list(pair.a_shape)} / {list(pair.b_shape)} do not fit the base weight "
            f"{list(base_shape)} (is this adapter for a different base model?)",
            module=pair.module,
        )
    pair.rank = rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first
    pattern that matches the end of the module name at a dot boundary, as a regex."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return module


def _pair_order(pair: _Pair) -> tuple[int, int, str]:
    name = pair.gguf_base
    if name.startswith("token_embd"):
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0, name)


# --------------------------------------------------------------------------------------------
# Writing


def _write(out_path: Path, plan: _Plan, dtype: str, adapter_dir: Path, progress: ProgressFn | None) -> None:
    """Header and tensor infos first, then each tensor's data in turn (one tensor in memory)."""
    import gguf
    import numpy as np

    np_dtype = np.dtype(np.float16 if dtype == "f16" else np.float32)
    source = adapter_dir / ADAPTER_WEIGHTS
    tensors: list[tuple[str, _Pair, str]] = []
    for pair in plan.pairs:
        tensors.append((pair.gguf_base + ".lora_a", pair, "a"))
        tensors.append((pair.gguf_base + ".lora_b", pair, "b"))

    writer = gguf.GGUFWriter(str(out_path), plan.gguf_arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
        writer.add_name(adapter_dir.name)
        writer.add_file_type(_FILE_TYPES[dtype])
        for name, pair, which in tensors:
            shape = _out_shape(pair, which)
            writer.add_tensor_info(name, shape, np_dtype, _count(shape) * np_dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (name, pair, which) in enumerate(tensors, start=1):
            data = _tensor_data(source, pair, which).astype(np_dtype, copy=False)
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(done, len(tensors), f"wrote {name} {list(_out_shape(pair, which))} {dtype}")
    finally:
        writer.close()


def _out_shape(pair: _Pair, which: str) -> tuple[int, ...]:
    if which == "a":
        return tuple(reversed(pair.a_shape)) if pair.embedding else pair.a_shape
    return pair.b_shape


def _tensor_data(source: Path, pair: _Pair, which: str) -> Any:
    """One factor as float32 in llama.cpp's layout: lora_b rows permuted for rope like the base's
    Q/K rows and multiplied by the folded scale; an embedding's lora_a transposed."""
    import numpy as np

    if which == "a":
        tensor = _Tensor(pair.gguf_base + ".lora_a", pair.a_key, source, pair.a_shape, pair.a_dtype, "f32")
        data = _load_tensor(tensor)
        return np.ascontiguousarray(data.T) if pair.embedding else data
    tensor = _Tensor(pair.gguf_base + ".lora_b", pair.b_key, source, pair.b_shape, pair.b_dtype, "f32",
                     pair.permute_heads)
    data = _load_tensor(tensor)
    if pair.fold != 1.0:
        data *= np.float32(pair.fold)
    return data
