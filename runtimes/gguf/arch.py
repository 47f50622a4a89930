"""What llama.cpp expects of each architecture our GGUF writer supports.

Re-derived from llama.cpp at the version llama-cpp-python vendors (its converter's conversion/*.py
for names and transforms, src/models/*.cpp for what the loader reads and how the graph computes)
and held to it by tests/test_gguf_archs.py. Per architecture: the GGUF arch name, the tensor names,
the per-tensor transforms, the hparam keys, and the refusals: any config value llama.cpp would
compute differently is an UnsupportedModel here, never a file that loads but answers wrong.

- Llama/Mistral ("llama"): Q/K rows permuted for llama.cpp's adjacent-pair rope. Mistral's
  sliding_window is not written (llama.cpp's llama arch attends fully, as with its converter):
  outputs agree with transformers while the context stays within the window.
- Qwen2, Qwen3 (NEOX rope, HF layout as is): Qwen2's q/k/v biases; Qwen3's per-head q/k RMS norms.
- Gemma 2, Gemma 3 (text-only Gemma3ForCausalLM): HF's RMSNorm multiplies by (1 + w), llama.cpp's
  by w, so every norm weight is written as w + 1. llama.cpp applies the sqrt(hidden) embedding scale
  itself. Gemma 2: attention and final logit soft-capping (llama.cpp always applies both, so a
  config without them is refused) and the sliding window on alternate layers. Gemma 3: final
  soft-capping when set, local/global rope bases. Where HF's layer_types differ from llama.cpp's
  default pattern (every 2nd / 6th layer global) the per-layer pattern is written explicitly.
  llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B layer counts), so
  another query_pre_attn_scalar is refused.
- Phi-3 ("phi3"): fused qkv_proj -> attn_qkv and gate_up_proj -> ffn_up, as llama.cpp reads them.
  llama.cpp runs Phi-3 without its sliding window (it disabled Phi SWA), like Mistral above.
- BERT encoders ("bert", BertModel): absolute positions, token types (llama.cpp adds type 0),
  post-norm layers, non-causal, pooling from the sentence-transformers files when present.

Everything is plain data and config reading; nothing heavy is imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel

# Tensors llama.cpp keeps in float32 whatever the file type (as its converter does).
F32_TENSORS = {"position_embd.weight", "token_types.weight"}

_DECODER_GLOBALS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_DECODER_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_DECODER_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_ATTENTION = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", **_LLAMA_NORMS}

_BERT_GLOBALS = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_BERT_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_BERT_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")
_BERT = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
         "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
         "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm"}


@dataclass(frozen=True)
class ArchRule:
    gguf_arch: str
    layer_names: Mapping[str, str]  # HF module inside a layer -> GGUF block tensor
    permute_qk: bool = False  # llama.cpp's LLAMA rope (adjacent pairs) needs HF's split-half rows reordered
    norm_shift: float = 0.0  # added to every norm weight (Gemma: HF computes x * (1 + w))
    global_names: Mapping[str, str] = field(default_factory=lambda: _DECODER_GLOBALS)
    layer_re: re.Pattern[str] = _DECODER_LAYER_RE
    ignored: re.Pattern[str] = _DECODER_IGNORED
    untied_head: bool = True  # False: llama.cpp always reuses token_embd as the output (Gemma 2)
    encoder: bool = False

    def required(self, n_layers: int) -> list[str]:
        """The tensors a model of this arch must have, so a config/weights mismatch is caught here."""
        if self.encoder:
            names = ["token_embd.weight", "position_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias"]
            per_layer = [f"{part}.weight" for part in self.layer_names.values()]
            per_layer += [f"{part}.bias" for part in self.layer_names.values() if part.endswith("norm")]
        else:
            names = ["token_embd.weight", "output_norm.weight"]
            per_layer = [f"{part}.weight" for part in self.layer_names.values()]
        return names + [f"blk.{layer}.{part}" for layer in range(n_layers) for part in per_layer]


_LLAMA = ArchRule("llama", {**_ATTENTION, **_MLP, **_LLAMA_NORMS}, permute_qk=True)
RULES = {
    "LlamaForCausalLM": _LLAMA,  # SmolLM, TinyLlama, Llama 2/3
    "MistralForCausalLM": _LLAMA,  # llama.cpp runs Mistral as "llama"
    "Qwen2ForCausalLM": ArchRule("qwen2", {**_ATTENTION, **_MLP, **_LLAMA_NORMS}),
    "Qwen3ForCausalLM": ArchRule("qwen3", {**_ATTENTION, **_QK_NORMS, **_MLP, **_LLAMA_NORMS}),
    "Gemma2ForCausalLM": ArchRule("gemma2", {**_ATTENTION, **_MLP, **_GEMMA_NORMS}, norm_shift=1.0,
                                  untied_head=False),
    "Gemma3ForCausalLM": ArchRule("gemma3", {**_ATTENTION, **_QK_NORMS, **_MLP, **_GEMMA_NORMS}, norm_shift=1.0),
    "Phi3ForCausalLM": ArchRule("phi3", _PHI3),
    "BertModel": ArchRule("bert", _BERT, global_names=_BERT_GLOBALS, layer_re=_BERT_LAYER_RE,
                          ignored=_BERT_IGNORED, encoder=True),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(RULES))

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "phi3": "Phi3ForCausalLM", "bert": "BertModel"}


@dataclass(frozen=True)
class HParams:
    """The config values the plan checks against the weights, and the GGUF hparam keys."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    context_length: int
    tied_embeddings: bool
    keys: tuple[tuple[Any, ...], ...] = ()  # (GGUFWriter method, *arguments), written in this order


def architecture(config: dict[str, Any]) -> tuple[str, ArchRule]:
    """The HF class from config.architectures, or from model_type when a config was saved
    without it (config.save_pretrained on a bare config does not record architectures)."""
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    name = names[0] if names else _MODEL_TYPES.get(model_type, f"<none; model_type={model_type!r}>")
    if name not in RULES:
        raise UnsupportedModel(
            f"GGUF export does not support architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            architecture=name, supported=list(SUPPORTED_ARCHITECTURES),
        )
    return name, RULES[name]


def gguf_name(hf_name: str, rule: ArchRule = _LLAMA) -> str | None:
    if hf_name in rule.global_names:
        return rule.global_names[hf_name]
    match = rule.layer_re.match(hf_name)
    if match and match.group(2) in rule.layer_names:
        return f"blk.{match.group(1)}.{rule.layer_names[match.group(2)]}.{match.group(3)}"
    return None


# --------------------------------------------------------------------------------------------
# Config -> hparams


def hparams(config: dict[str, Any], hf_arch: str) -> HParams:
    """Read and validate the config; anything llama.cpp would compute differently is refused."""
    if hf_arch == "BertModel":
        return _bert_hparams(config)
    gemma = hf_arch.startswith("Gemma")
    activation = config.get("hidden_activation" if gemma else "hidden_act") or config.get("hidden_act", "silu")
    wanted = "gelu_pytorch_tanh" if gemma else "silu"  # llama.cpp: tanh-approximated GELU / SiLU
    if activation != wanted:
        raise UnsupportedModel(f"{hf_arch} with activation {activation!r} is not supported (only {wanted})")
    if config.get("mlp_bias"):
        raise UnsupportedModel(f"{hf_arch} with mlp_bias=true is not supported")
    if config.get("use_sliding_window"):  # Qwen2's switch; llama.cpp's qwen2 arch attends fully
        raise UnsupportedModel(f"{hf_arch} with use_sliding_window=true is not supported")
    rope = _rope_sets(config)
    for params in rope.values():
        kind = params.get("rope_type") or params.get("type")
        if kind not in (None, "default"):
            raise UnsupportedModel(
                f"{hf_arch} with rope scaling {kind!r} is not supported yet (only unscaled rope)", rope_type=kind
            )
    n_heads = int(config["num_attention_heads"])
    n_kv_heads = int(config.get("num_key_value_heads") or n_heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv_heads or head_dim % 2:
        raise UnsupportedModel(
            f"{hf_arch} with {n_heads} heads, {n_kv_heads} kv heads, head_dim {head_dim} is inconsistent"
        )
    n_layers = int(config["num_hidden_layers"])
    layer_types = config.get("layer_types")
    if not gemma and layer_types and set(layer_types) != {"full_attention"}:
        raise UnsupportedModel(f"{hf_arch} with layer_types {sorted(set(layer_types))} is not supported "
                               "(llama.cpp attends fully on every layer)")
    base = HParams(
        vocab_size=int(config["vocab_size"]), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_size=int(config["intermediate_size"]),
        context_length=int(config.get("max_position_embeddings") or 2048),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    keys = [
        ("add_context_length", base.context_length), ("add_embedding_length", hidden), ("add_block_count", n_layers),
        ("add_feed_forward_length", base.ffn_size), ("add_head_count", n_heads), ("add_head_count_kv", n_kv_heads),
        ("add_key_length", head_dim), ("add_value_length", head_dim),
        ("add_rope_freq_base", float(rope["full_attention"].get("rope_theta", 10000.0))),
        ("add_layer_norm_rms_eps", float(config.get("rms_norm_eps", 1e-6))),
    ]
    keys += _ARCH_KEYS[hf_arch](config, base, rope)
    return HParams(**{**base.__dict__, "keys": tuple(keys)})


def _rope_sets(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer type. transformers 5 nests them by layer type for Gemma 3 and
    keeps one set under rope_parameters otherwise; older configs have rope_theta (and Gemma 3's
    rope_local_base_freq) at the top level and the scaling under rope_scaling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & params.keys():
        return {"full_attention": {}, **{kind: value for kind, value in params.items() if isinstance(value, dict)}}
    merged = {**(config.get("rope_scaling") or {}), **(params or {})}
    merged.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    sets = {"full_attention": merged}
    if "rope_local_base_freq" in config:
        sets["sliding_attention"] = {"rope_theta": config["rope_local_base_freq"]}
    return sets


def _llama_keys(config: dict[str, Any], hp: HParams, rope: dict) -> list[tuple[str, Any]]:
    return [("add_vocab_size", hp.vocab_size), ("add_rope_dimension_count", hp.head_dim)]


def _no_keys(config: dict[str, Any], hp: HParams, rope: dict) -> list[tuple[str, Any]]:
    return []


def _phi3_keys(config: dict[str, Any], hp: HParams, rope: dict) -> list[tuple[str, Any]]:
    factor = rope["full_attention"].get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise UnsupportedModel(f"Phi3ForCausalLM with partial_rotary_factor {factor} is not supported yet")
    if hp.n_heads * hp.head_dim != hp.hidden_size:  # llama.cpp sizes attn_output as hidden x hidden
        raise UnsupportedModel("Phi3ForCausalLM with heads x head_dim != hidden_size is not supported")
    original = rope["full_attention"].get("original_max_position_embeddings") or config.get(
        "original_max_position_embeddings") or hp.context_length
    return [("add_rope_dimension_count", hp.head_dim), ("add_rope_scaling_orig_ctx_len", int(original)),
            ("add_sliding_window", int(config.get("sliding_window") or 0))]  # read, then ignored by llama.cpp


def _gemma_scale_check(config: dict[str, Any], hp: HParams, hf_arch: str, big_layers: int) -> None:
    """llama.cpp hard-codes the query scale: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
    27B models (recognised by their layer count); HF uses query_pre_attn_scalar."""
    scalar = config.get("query_pre_attn_scalar", hp.head_dim)
    llama_scalar = hp.hidden_size // hp.n_heads if hp.n_layers == big_layers else hp.head_dim
    if scalar != llama_scalar:
        raise UnsupportedModel(f"{hf_arch} with query_pre_attn_scalar {scalar} is not supported: llama.cpp "
                               f"scales queries by 1/sqrt({llama_scalar}) for a {hp.n_layers}-layer model")


def _sliding_pattern(config: dict[str, Any], hp: HParams, hf_arch: str, period: int) -> list[bool]:
    """Which layers use the sliding window, from layer_types (or the older sliding_window_pattern)."""
    types = config.get("layer_types")
    if types is None:
        pattern = int(config.get("sliding_window_pattern") or period)
        return [bool((layer + 1) % pattern) for layer in range(hp.n_layers)]
    if len(types) != hp.n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModel(f"{hf_arch} with layer_types {types} is not supported")
    return [kind == "sliding_attention" for kind in types]


def _window_keys(pattern: list[bool], window: int, period: int) -> list[tuple[str, Any]]:
    """llama.cpp's default: layer i slides unless i % period == period - 1; write the layer list
    only when HF's differs."""
    keys: list[tuple[str, Any]] = [("add_sliding_window", window)]
    if pattern != [layer % period < period - 1 for layer in range(len(pattern))]:
        keys.append(("add_sliding_window_pattern", pattern))
    return keys


def _gemma2_keys(config: dict[str, Any], hp: HParams, rope: dict) -> list[tuple[str, Any]]:
    _gemma_scale_check(config, hp, "Gemma2ForCausalLM", big_layers=46)
    caps = {key: config.get(key) for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    missing = [key for key, value in caps.items() if value is None]
    if missing or not config.get("sliding_window"):
        raise UnsupportedModel(f"Gemma2ForCausalLM without {', '.join(missing) or 'sliding_window'} is not "
                               "supported: llama.cpp's gemma2 always applies soft-capping and the sliding window")
    pattern = _sliding_pattern(config, hp, "Gemma2ForCausalLM", period=2)
    return [("add_attn_logit_softcapping", float(caps["attn_logit_softcapping"])),
            ("add_final_logit_softcapping", float(caps["final_logit_softcapping"])),
            *_window_keys(pattern, int(config["sliding_window"]), period=2)]


def _gemma3_keys(config: dict[str, Any], hp: HParams, rope: dict) -> list[tuple[str, Any]]:
    _gemma_scale_check(config, hp, "Gemma3ForCausalLM", big_layers=62)
    if config.get("attn_logit_softcapping") is not None:
        raise UnsupportedModel("Gemma3ForCausalLM with attn_logit_softcapping is not supported (llama.cpp has none)")
    if config.get("use_bidirectional_attention"):
        raise UnsupportedModel("Gemma3ForCausalLM with use_bidirectional_attention is not supported")
    keys: list[tuple[str, Any]] = [
        ("add_rope_freq_base_swa", float(rope.get("sliding_attention", {}).get("rope_theta", 10000.0)))]
    if config.get("final_logit_softcapping") is not None:
        keys.append(("add_final_logit_softcapping", float(config["final_logit_softcapping"])))
    pattern = _sliding_pattern(config, hp, "Gemma3ForCausalLM", period=6)
    if config.get("sliding_window") and any(pattern):
        keys += _window_keys(pattern, int(config["sliding_window"]), period=6)
    return keys


_ARCH_KEYS = {
    "LlamaForCausalLM": _llama_keys, "MistralForCausalLM": _llama_keys, "Qwen2ForCausalLM": _no_keys,
    "Qwen3ForCausalLM": _no_keys, "Phi3ForCausalLM": _phi3_keys, "Gemma2ForCausalLM": _gemma2_keys,
    "Gemma3ForCausalLM": _gemma3_keys,
}


def _bert_hparams(config: dict[str, Any]) -> HParams:
    activation = config.get("hidden_act", "gelu")
    if activation != "gelu":
        raise UnsupportedModel(f"BertModel with hidden_act={activation!r} is not supported (only gelu)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModel(f"BertModel with position_embedding_type={config['position_embedding_type']!r} "
                               "is not supported (only absolute)")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise UnsupportedModel("BertModel as a decoder is not supported")
    n_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    hp = HParams(vocab_size=int(config["vocab_size"]), hidden_size=hidden, n_layers=int(config["num_hidden_layers"]),
                 n_heads=n_heads, n_kv_heads=n_heads, head_dim=hidden // n_heads,
                 ffn_size=int(config["intermediate_size"]),
                 context_length=int(config.get("max_position_embeddings", 512)), tied_embeddings=False)
    keys = (("add_context_length", hp.context_length), ("add_embedding_length", hidden),
            ("add_block_count", hp.n_layers), ("add_feed_forward_length", hp.ffn_size), ("add_head_count", n_heads),
            ("add_layer_norm_eps", float(config.get("layer_norm_eps", 1e-12))), ("add_causal_attention", False),
            ("add_token_type_count", int(config.get("type_vocab_size", 2))))
    return HParams(**{**hp.__dict__, "keys": keys})


_POOLING = {"pooling_mode_mean_tokens": 1, "pooling_mode_cls_token": 2, "pooling_mode_lasttoken": 3}  # gguf.PoolingType
_PASSIVE_MODULES = ("Transformer", "Normalize")  # Normalize: cosine-equal; llama.cpp's embed normalizes itself


def pooling_keys(model_dir: Path, gguf_arch: str) -> list[tuple[Any, ...]]:
    """The pooling llama.cpp should apply, from sentence-transformers' modules.json; a module
    llama.cpp cannot run (Dense, ...) or a pooling mode it lacks is refused, since the GGUF's
    embeddings would then differ from the model's."""
    path = model_dir / "modules.json"
    if not path.is_file():
        return []
    keys: list[tuple[Any, ...]] = []
    for module in json.loads(path.read_text(encoding="utf-8")):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind in _PASSIVE_MODULES:
            continue
        if kind != "Pooling":
            raise UnsupportedModel(f"sentence-transformers module {kind} has no llama.cpp equivalent", module=kind)
        pooling = json.loads((model_dir / module["path"] / "config.json").read_text(encoding="utf-8"))
        modes = [name for flag, name in _POOLING.items() if pooling.get(flag)]
        others = [flag for flag, on in pooling.items()
                  if flag.startswith("pooling_mode") and on and flag not in _POOLING]
        if len(modes) != 1 or others:
            raise UnsupportedModel(f"sentence-transformers pooling {pooling} is not supported (only mean, cls, last)")
        keys.append(("add_uint32", f"{gguf_arch}.pooling_type", modes[0]))
    return keys


def check_plan(names: Mapping[str, tuple[int, ...]], hp: HParams, rule: ArchRule) -> None:
    """Catch a config that disagrees with the weights here, not as a llama.cpp load failure."""
    missing = [name for name in rule.required(hp.n_layers) if name not in names]
    if missing:
        raise UnsupportedModel(
            f"checkpoint lacks {len(missing)} tensor(s) a {hp.n_layers}-layer {rule.gguf_arch} model needs, "
            f"e.g. {missing[0]}"
        )
    embed = names["token_embd.weight"]
    if embed != (hp.vocab_size, hp.hidden_size):
        raise UnsupportedModel(f"embedding shape {embed} differs from the config's vocab_size x hidden_size "
                               f"({hp.vocab_size}, {hp.hidden_size})")
    q_rows, kv_rows = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    if "blk.0.attn_qkv.weight" in names:
        shapes = {"attn_qkv": (q_rows + 2 * kv_rows, hp.hidden_size), "ffn_up": (2 * hp.ffn_size, hp.hidden_size)}
    else:
        shapes = {"attn_q": (q_rows, hp.hidden_size), "attn_k": (kv_rows, hp.hidden_size)}
    for part, shape in shapes.items():
        if names[f"blk.0.{part}.weight"] != shape:
            raise UnsupportedModel(f"{part} has shape {names[f'blk.0.{part}.weight']}, but the config implies {shape}")
    if rule.encoder and names["position_embd.weight"][0] != hp.context_length:
        raise UnsupportedModel("position embeddings do not match max_position_embeddings")
