"""Reading a PEFT LoRA adapter from disk: its config, its tensor headers, one (A, B) pair per
adapted module, and the scale peft gives each module.

Shared by the GGUF adapter writer (runtimes/gguf/lora.py) and the merger (runtimes/hf/merge.py),
so both read an adapter, and refuse what they cannot carry, in the same way. Each caller names
the options it refuses on top of the common ones and says what it was trying to do (`action`),
which every message repeats.

Only headers are read here (no tensor data), and nothing heavy is imported.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class AdapterMismatch(UnsupportedModel):
    """The adapter was made for another base model (its shapes, or the base it names)."""

    error_kind = "adapter_mismatch"


# Options no caller handles: LoRA variants peft runs with extra forward logic, and adapters that
# expect a different base (replicated layers, raw-parameter targets). Any truthy value is refused.
COMMON_REFUSALS = {
    "trainable_token_indices": "trainable tokens (trainable_token_indices), which replace embedding rows",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
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
PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.[^.]+)?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


@dataclass(frozen=True)
class Stored:
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Pair:
    """One adapted module: its lora_A / lora_B tensors (and DoRA's magnitude vector, if any)."""

    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    embedding: bool
    a_key: str | None = None
    b_key: str | None = None
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()
    a_dtype: str = ""
    b_dtype: str = ""
    m_key: str | None = None  # lora_magnitude_vector (DoRA)
    m_shape: tuple[int, ...] = ()
    rank: int = 0


def read_adapter_config(adapter_dir: Path, *, action: str, refused: Mapping[str, str] = {}) -> dict[str, Any]:
    """adapter_config.json, after refusing what neither caller handles plus the caller's `refused`
    options; `action` completes "cannot ..." in the messages (e.g. "convert this adapter to a GGUF LoRA")."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise UnsupportedModel(f"{adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG})", path=str(adapter_dir))
    config = json.loads(path.read_text(encoding="utf-8"))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedModel(f"cannot {action}: only LoRA adapters are supported, not peft_type {peft_type}",
                               peft_type=peft_type)
    for key, what in {**COMMON_REFUSALS, **refused}.items():
        if config.get(key):
            raise UnsupportedModel(f"cannot {action}: {what}", option=key)
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise UnsupportedModel(
            f"cannot {action}: it was initialised with init_lora_weights={init!r}, which changes the base weights, "
            "so it belongs to that changed base (save it with peft's conversion to a plain LoRA first)",
            option="init_lora_weights",
        )
    return config


def adapter_weights(adapter_dir: Path) -> dict[str, Stored]:
    """Tensor names, shapes and dtypes of adapter_model.safetensors, from its header only."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            raise UnsupportedModel(f"{adapter_dir} holds a pickle adapter (adapter_model.bin); only safetensors "
                                   "adapters are read (peft saves safetensors by default)", path=str(adapter_dir))
        raise UnsupportedModel(f"{adapter_dir} has no {ADAPTER_WEIGHTS}", path=str(adapter_dir))
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return {name: Stored(tuple(info["shape"]), info["dtype"]) for name, info in header.items()}


def pair_tensors(weights: dict[str, Stored], *, action: str, make: Callable[..., Pair] = Pair) -> list[Pair]:
    """Group lora_A/lora_B (or lora_embedding_A/B) and DoRA magnitudes by module; refuse anything
    else in the file. peft's saved copies of frozen base embeddings (`*.base_layer.weight`) are
    left to the caller. `make` builds each pair (a caller's subclass of Pair)."""
    pairs: dict[str, Pair] = {}
    magnitudes: dict[str, tuple[str, Stored]] = {}
    others: list[str] = []
    for key, stored in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".base_layer.weight"):
            continue
        magnitude = _MAGNITUDE_KEY.match(name)
        if magnitude is not None:
            magnitudes[magnitude["module"]] = (key, stored)
            continue
        match = _LINEAR_KEY.match(name) or _EMBED_KEY.match(name)
        if match is None:
            others.append(key)
            continue
        embedding = match.re is _EMBED_KEY
        pair = pairs.setdefault(match["module"], make(match["module"], embedding))
        if pair.embedding != embedding:
            raise UnsupportedModel(f"{match['module']} mixes linear and embedding LoRA tensors")
        if len(stored.shape) != 2:
            raise UnsupportedModel(f"cannot {action}: adapter tensor {key} has shape {list(stored.shape)}; only 2-D "
                                   "LoRA factors are supported (no convolution LoRA)", tensor=key)
        if match["which"] == "A":
            pair.a_key, pair.a_shape, pair.a_dtype = key, stored.shape, stored.dtype
        else:
            pair.b_key, pair.b_shape, pair.b_dtype = key, stored.shape, stored.dtype
    if others:
        raise UnsupportedModel(describe_extra_tensors(others, action), tensors=sorted(others))
    incomplete = [p.module for p in pairs.values() if p.a_key is None or p.b_key is None]
    orphans = sorted(set(magnitudes) - set(pairs))
    if incomplete or orphans:
        raise UnsupportedModel(f"the adapter lacks lora_A or lora_B for {len(incomplete) + len(orphans)} module(s), "
                               f"e.g. {sorted(incomplete + orphans)[0]}")
    if not pairs:
        raise UnsupportedModel("the adapter holds no LoRA tensors")
    for module, (key, stored) in magnitudes.items():
        pairs[module].m_key, pairs[module].m_shape = key, stored.shape
    for pair in pairs.values():
        for key, dtype in ((pair.a_key, pair.a_dtype), (pair.b_key, pair.b_dtype)):
            if dtype not in FLOAT_DTYPES:
                raise UnsupportedModel(f"adapter tensor {key} has dtype {dtype}; only float adapters are supported")
        pair.rank = pair.a_shape[0]
    return list(pairs.values())


def describe_extra_tensors(names: list[str], action: str) -> str:
    shown = ", ".join(sorted(names)[:3])
    if any("modules_to_save" in n or n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in names):
        return f"cannot {action}: the adapter has fully trained modules (modules_to_save: {shown})"
    if any("trainable_tokens" in n for n in names):
        return f"cannot {action}: the adapter has trainable tokens ({shown})"
    if any(n.endswith(".bias") for n in names):
        return f"cannot {action}: the adapter trains biases ({shown})"
    return f"cannot {action}: the adapter holds {len(names)} tensor(s) that are not LoRA factors, e.g. {shown}"


def check_shapes(pair: Pair, base_shape: tuple[int, ...], *, fan_in_fan_out: bool = False, adapter: Any = "",
                 model: Any = "") -> None:
    """PEFT stores lora_A [r, in] and lora_B [out, r] for a linear [out, in] ([in, out] with
    fan_in_fan_out, GPT-2's Conv1D), and lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
    for an embedding [vocab, hidden]; a DoRA magnitude has one value per output row."""
    rank = pair.a_shape[0]
    if pair.embedding:
        n_in, n_out = base_shape
    elif fan_in_fan_out:
        n_in, n_out = base_shape
    else:
        n_out, n_in = base_shape
    magnitude_ok = pair.m_key is None or pair.m_shape == (n_out,)
    if pair.a_shape != (rank, n_in) or pair.b_shape != (n_out, rank) or not magnitude_ok:
        names = f" (adapter {adapter}, model {model})" if adapter or model else ""
        raise AdapterMismatch(
            f"{pair.module}: LoRA shapes {list(pair.a_shape)} / {list(pair.b_shape)} do not fit the base weight "
            f"{list(base_shape)}: is this adapter for a different base model?{names}",
            module=pair.module, adapter=str(adapter), model=str(model), adapter_shapes=[list(pair.a_shape), list(pair.b_shape)],
            base_shape=list(base_shape),
        )
    pair.rank = rank


def pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first
    pattern that matches the end of the module name at a dot boundary, as a regex."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return module


def module_scale(config: dict[str, Any], pair: Pair, weight: float = 1.0) -> float:
    """peft's scale for one module, as LoraLayer.set_scale computes it: weight * alpha / r, or
    weight * alpha / sqrt(r) with use_rslora, alpha and r from alpha_pattern / rank_pattern."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    expected_rank = int(rank_pattern.get(pattern_key(rank_pattern, pair.module), config.get("r", 8)))
    if pair.rank != expected_rank:
        raise UnsupportedModel(f"{pair.module} has rank {pair.rank} in the weights but {expected_rank} in "
                               f"{ADAPTER_CONFIG}", module=pair.module)
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, pair.module), config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return weight * alpha / math.sqrt(pair.rank)
    return weight * alpha / pair.rank


_ROUNDING = {"BF16": 2.0**-8 * 1.01, "F16": 2.0**-11 * 1.01, "F32": 0.0, "F64": 0.0}  # half an ulp, relative


def same_values(ours: Any, theirs: Any, our_dtype: str, their_dtype: str) -> bool:
    """Whether peft's saved copy of a base tensor equals the base's own: exactly for one dtype, within
    the narrower float's rounding when the copy was saved in another (a model trained in bf16)."""
    import numpy as np

    coarser = max((our_dtype, their_dtype), key=lambda d: _ROUNDING.get(d, 0.0))
    return bool(np.allclose(ours, theirs, rtol=_ROUNDING.get(coarser, 0.0), atol=1e-7 if coarser == "F16" else 0.0))
