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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel
from runtimes.peft_adapter import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    Pair,
    Stored,
    adapter_weights,
    check_shapes,
    module_scale,
    pair_tensors,
    read_adapter_config,
    same_values,
)
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

_ACTION = "convert this adapter to a GGUF LoRA"
# What a llama.cpp LoRA adapter cannot express beyond what runtimes.peft_adapter refuses for every
# caller. Any truthy value is refused; the message names the feature.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora=true): llama.cpp adapters have no magnitude vector; merge the adapter "
                "into the base (merge_lora) and export that instead",
    "modules_to_save": "modules_to_save (whole replacement modules): llama.cpp adapters carry only LoRA pairs; "
                       "merge the adapter into the base and export that instead",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) replace embedding rows, which a "
                               "llama.cpp adapter cannot carry",
    "lora_bias": "LoRA biases (lora_bias=true): llama.cpp adapters have no bias term",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not converted yet",
}


@dataclass
class _Pair(Pair):
    """One adapted module (runtimes.peft_adapter.Pair) and everything needed to write it."""

    gguf_base: str = ""  # e.g. blk.0.attn_q.weight
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
    lora_config = read_adapter_config(adapter_dir, action=_ACTION, refused=_REFUSED_OPTIONS)
    weights = adapter_weights(adapter_dir)
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


def _plan(config: dict[str, Any], weights: dict[str, Stored], base_dir: Path, adapter_file: Path) -> _Plan:
    base_config = _read_json(base_dir / "config.json")
    hf_arch, rule = _architecture(base_config)
    hp = _hparams(base_config, hf_arch)
    sources = _scan_weights(base_dir)
    base_shapes = {name: source.shape for name, source in sources.items()}

    pairs = pair_tensors(weights, action=_ACTION, make=_Pair)
    if any(pair.m_key for pair in pairs):
        raise UnsupportedModel(f"cannot {_ACTION}: a DoRA adapter (magnitude vectors such as "
                               f"{sorted(p.m_key for p in pairs if p.m_key)[0]}) has no llama.cpp form; merge it "
                               "into the base (merge_lora) and export that instead")
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
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
        gguf_base = _gguf_name(hf_weight, rule)  # this architecture's names: Phi-3's fused qkv_proj is attn_qkv
        if gguf_base is None or hf_weight not in base_shapes or len(base_shapes[hf_weight]) != 2:
            unsupported.append(pair.module)
            continue
        pair.gguf_base = gguf_base
        check_shapes(pair, base_shapes[hf_weight])
        pair.peft_scale = module_scale(config, pair)
        llama_scale = file_alpha / pair.rank if file_alpha else 1.0  # llama.cpp: no division when alpha is 0
        pair.fold = 1.0 if math.isclose(pair.peft_scale, llama_scale, rel_tol=1e-7) else pair.peft_scale / llama_scale
        pair.permute_heads = 0 if pair.embedding else _permute_heads(gguf_base, hp, rule)
    if unsupported:
        shown = ", ".join(sorted(unsupported)[:5])
        raise UnsupportedModel(
            f"the adapter targets {len(unsupported)} module(s) that have no llama.cpp tensor in this {hf_arch} "
            f"base, e.g. {shown}; supported: {', '.join(_linear_modules(rule))}, embed_tokens and lm_head "
            "(untied embeddings only)",
            modules=sorted(unsupported),
        )
    _check_base_copies(weights, adapter_file, sources)
    return _Plan(rule.gguf_arch, file_alpha, sorted(pairs, key=_pair_order))


def _linear_modules(rule: Any) -> list[str]:
    """The per-layer projections an adapter may target in this architecture (norms are not linear layers)."""
    return [name.rsplit(".", 1)[-1] for name, gguf in rule.layer_names.items()
            if gguf.startswith(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_")) and "norm" not in gguf]


def _check_base_copies(weights: dict[str, Stored], adapter_file: Path, sources: dict[str, Any]) -> None:
    """peft saves the frozen embedding / lm_head weights beside an adapter that targets them
    (save_embedding_layers), since a vocabulary resized for training changes them. The GGUF adapter
    runs on the original base, so each copy must equal the base's tensor: otherwise refuse."""
    copies = {key: stored for key, stored in weights.items() if key.endswith(".base_layer.weight")}
    if not copies:
        return
    for key, stored in copies.items():
        name = key.removeprefix(PEFT_PREFIX)
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
        if not same_values(ours, theirs, stored.dtype, source.dtype):
            raise UnsupportedModel(
                f"the adapter carries its own {hf_name} whose values differ from the base's (new tokens trained?); "
                "a GGUF LoRA runs on the base's weights: merge the adapter and export that",
                tensor=key,
            )


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
