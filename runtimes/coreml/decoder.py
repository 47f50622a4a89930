"""An export-friendly causal decoder in plain torch ops, loading Hugging Face weights as they are.

coremltools cannot trace transformers' own decoders (their mask code uses ops it lacks), so this
module re-states the forward pass of every causal architecture our GGUF writer supports with only
what converts cleanly: embedding gather, RMSNorm, rotary tables gathered by position,
scaled_dot_product_attention with an additive mask built in the graph from int32 positions, and
the MLP. Parameter names are Hugging Face's, so the checkpoint loads with a strict
load_state_dict; tests/test_coreml_decoder.py holds the logits to transformers' within 1e-4 in
float32, with and without the KV cache.

Choices made for float16 on Apple devices:
- RMSNorm divides by the row's largest magnitude before squaring (the same value in exact
  arithmetic) so sum(x^2) cannot overflow float16's 65504;
- masked scores get -1e4, not finfo.min (which is -inf in float16 and turns a row into NaN);
- L2 normalisation of the pooled embedding is rescaled the same way.
The KV cache is two buffers, [layers, kv_heads, context, head_dim], that Core ML keeps as states;
each call writes its chunk in place at `position` (a slice update) and attends over the whole
buffer under the mask, so every input is int32 and the shapes are static.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from runtimes.base import UnsupportedModel

MASKED = -1e4  # fits float16 with room; exp(-1e4 - max) is 0 in every precision
# HF class -> (transformers module, rotary class, family)
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaRotaryEmbedding", "llama"),
    "MistralForCausalLM": ("mistral", "MistralRotaryEmbedding", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2RotaryEmbedding", "llama"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3RotaryEmbedding", "llama"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2RotaryEmbedding", "gemma"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3RotaryEmbedding", "gemma"),
    "Phi3ForCausalLM": ("phi3", "Phi3RotaryEmbedding", "llama"),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "phi3": "Phi3ForCausalLM"}
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu": F.gelu}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # dynamic and longrope change with the sequence length


@dataclass(frozen=True)
class DecoderSpec:
    """What the forward pass needs from config.json, settled (and refused) before any weights load."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    eps: float
    activation: str
    tied: bool
    gemma: bool  # norms x * (1 + w), embeddings * sqrt(hidden), sandwich norms
    qk_norm: bool
    fused: bool  # Phi-3: qkv_proj, gate_up_proj
    scale: float  # on q.k
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]  # per layer: the sliding window, None for full attention
    layer_types: tuple[str, ...]  # per layer: the rotary table it uses
    hf_config: Any = field(repr=False, compare=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "hf_config"}


def architecture_of(config: dict[str, Any]) -> str:
    names = config.get("architectures") or []
    name = names[0] if names else _MODEL_TYPES.get(config.get("model_type"), f"<none; model_type={config.get('model_type')!r}>")
    if name not in ARCHITECTURES:
        raise UnsupportedModel(f"Core ML export does not support architecture {name}; supported: "
                               f"{', '.join(SUPPORTED_ARCHITECTURES)}", architecture=name,
                               supported=list(SUPPORTED_ARCHITECTURES))
    return name


def read_spec(model_dir: Path) -> DecoderSpec:
    import transformers

    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    name = architecture_of(raw)
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    config = getattr(config, "text_config", None) or config
    family = ARCHITECTURES[name][2]
    gemma = family == "gemma"
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(config, "sliding_window", None)
    if name in ("MistralForCausalLM", "Phi3ForCausalLM"):  # transformers applies their window to every layer
        windows = tuple(window for _ in range(layers))
    else:
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    if activation not in _ACTIVATIONS:
        raise UnsupportedModel(f"activation {activation!r} is not supported by the Core ML export "
                               f"(supported: {', '.join(sorted(_ACTIVATIONS))})", activation=activation)
    for layer_type in set(types):
        rope = _rope_parameters(config, layer_type)
        if rope.get("rope_type", "default") not in _STATIC_ROPE:
            raise UnsupportedModel(f"rope_type {rope.get('rope_type')!r} changes its frequencies with the sequence length; "
                                   f"the Core ML export supports {', '.join(_STATIC_ROPE)}", rope_type=rope.get("rope_type"))
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel("use_bidirectional_attention is not a causal decoder; the Core ML export needs a causal LM")
    scale = (config.query_pre_attn_scalar ** -0.5) if gemma else head_dim ** -0.5
    return DecoderSpec(
        architecture=name, vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=layers,
        num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, max_positions=config.max_position_embeddings,
        eps=config.rms_norm_eps, activation=activation, tied=bool(getattr(config, "tie_word_embeddings", False)),
        gemma=gemma, qk_norm=name in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"), fused=name == "Phi3ForCausalLM",
        scale=scale, attn_softcap=getattr(config, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None,
        windows=windows, layer_types=types, hf_config=config)


def _rope_parameters(config: Any, layer_type: str) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    nested = params.get(layer_type)
    return nested if isinstance(nested, dict) else params


def rotary_tables(spec: DecoderSpec, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin, [length, rotary_dim], per layer type, from transformers' own rotary module."""
    import importlib

    module_name, class_name, _ = ARCHITECTURES[spec.architecture]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rotary = getattr(module, class_name)(spec.hf_config)
    positions = torch.arange(length, dtype=torch.float32)
    tables = {}
    for layer_type in set(spec.layer_types):
        if spec.architecture == "Gemma3ForCausalLM":
            inv_freq, scaling = getattr(rotary, f"{layer_type}_inv_freq"), getattr(rotary, f"{layer_type}_attention_scaling")
        else:
            inv_freq, scaling = rotary.inv_freq, rotary.attention_scaling
        freqs = positions[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        tables[layer_type] = (emb.cos() * scaling, emb.sin() * scaling)
    return tables


class RMSNorm(nn.Module):
    """HF's RMSNorm in float32, rescaled by the row's max magnitude so float16 cannot overflow."""

    def __init__(self, dim: int, eps: float, offset: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset
        self.compute_dtype = torch.float32  # what Core ML's float16 precision runs is float16: tests set it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        weight = self.weight.to(self.compute_dtype)
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
        scaled = x / peak
        normed = scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + self.eps / (peak * peak))
        return normed * (weight + self.offset) if self.offset else normed * weight


def _linear(inputs: int, outputs: int, bias: bool) -> nn.Linear:
    return nn.Linear(inputs, outputs, bias=bias)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, biases: set[str]) -> None:
        super().__init__()
        h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.spec = spec
        if spec.fused:
            self.qkv_proj = _linear(spec.hidden_size, (h + 2 * kv) * d, "qkv_proj" in biases)
        else:
            self.q_proj = _linear(spec.hidden_size, h * d, "q_proj" in biases)
            self.k_proj = _linear(spec.hidden_size, kv * d, "k_proj" in biases)
            self.v_proj = _linear(spec.hidden_size, kv * d, "v_proj" in biases)
        self.o_proj = _linear(h * d, spec.hidden_size, "o_proj" in biases)
        self.rotary_dim = d  # set by the Decoder from its rotary tables
        if spec.qk_norm:
            offset = 1.0 if spec.gemma else 0.0
            self.q_norm = RMSNorm(d, spec.eps, offset)
            self.k_norm = RMSNorm(d, spec.eps, offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor] | None) -> torch.Tensor:
        spec = self.spec
        h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        t = x.shape[1]
        if spec.fused:
            q, k, v = self.qkv_proj(x).split([h * d, kv * d, kv * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(1, t, h, d).transpose(1, 2)
        k = k.view(1, t, kv, d).transpose(1, 2)
        v = v.view(1, t, kv, d).transpose(1, 2)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        dim = self.rotary_dim
        q, k = _rotate(q, cos, sin, dim, d), _rotate(k, cos, sin, dim, d)
        if cache is not None:  # write this chunk at `position`, attend over the whole buffer
            keys, values, layer, start = cache
            keys[layer, :, start:start + t, :] = k[0].to(keys.dtype)
            values[layer, :, start:start + t, :] = v[0].to(values.dtype)
            k = keys[layer:layer + 1].to(q.dtype)
            v = values[layer:layer + 1].to(q.dtype)
        if kv != h:  # grouped-query attention: each kv head serves h / kv query heads
            n = h // kv
            k = k[:, :, None].expand(1, kv, n, k.shape[2], d).reshape(1, h, k.shape[2], d)
            v = v[:, :, None].expand(1, kv, n, v.shape[2], d).reshape(1, h, v.shape[2], d)
        if spec.attn_softcap:  # Gemma 2 caps the scores before the mask: no fused attention for it
            scores = torch.matmul(q, k.transpose(2, 3)) * spec.scale
            scores = torch.tanh(scores / spec.attn_softcap) * spec.attn_softcap + mask
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
        else:
            # coremltools emits the fused iOS 18 op only without `scale`: fold a non-default scale into q
            if abs(spec.scale * math.sqrt(d) - 1.0) > 1e-12:
                q = q * (spec.scale * math.sqrt(d))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(1, t, h * d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
    """HF's rotate-half rope on the first `dim` dims (Phi-3's partial rotary keeps the rest). Sizes
    are Python ints, not traced shapes, so the graph has only constant slices."""
    rot, rest = (x, None) if dim == head_dim else (x[..., :dim], x[..., dim:])
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, biases: set[str]) -> None:
        super().__init__()
        self.fused = spec.fused
        self.act = _ACTIVATIONS[spec.activation]
        if spec.fused:
            self.gate_up_proj = _linear(spec.hidden_size, 2 * spec.intermediate_size, "gate_up_proj" in biases)
        else:
            self.gate_proj = _linear(spec.hidden_size, spec.intermediate_size, "gate_proj" in biases)
            self.up_proj = _linear(spec.hidden_size, spec.intermediate_size, "up_proj" in biases)
        self.down_proj = _linear(spec.intermediate_size, spec.hidden_size, "down_proj" in biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class Layer(nn.Module):
    def __init__(self, spec: DecoderSpec, biases: set[str]) -> None:
        super().__init__()
        offset = 1.0 if spec.gemma else 0.0
        self.gemma = spec.gemma
        self.self_attn = Attention(spec, biases)
        self.mlp = MLP(spec, biases)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.eps, offset)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.eps, offset)
        if spec.gemma:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.eps, offset)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.eps, offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: Any) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.gemma:
            x = x + self.post_attention_layernorm(attended)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, spec: DecoderSpec, biases: set[str]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Layer(spec, biases) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.eps, 1.0 if spec.gemma else 0.0)


class Decoder(nn.Module):
    """The whole causal LM. `context_length` sizes the rotary tables and, with `cache_dtype`, the
    KV cache buffers (key_cache, value_cache: [layers, kv_heads, context_length, head_dim])."""

    def __init__(self, spec: DecoderSpec, context_length: int, biases: set[str] = frozenset(),
                 cache_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec, self.context_length = spec, context_length
        self.model = Body(spec, biases)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.layer_types = sorted(set(spec.layer_types))
        for index, (cos, sin) in enumerate(rotary_tables(spec, context_length)[t] for t in self.layer_types):
            self.register_buffer(f"rope_cos_{index}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{index}", sin, persistent=False)
        for layer in self.model.layers:
            layer.self_attn.rotary_dim = int(cos.shape[-1])
        if cache_dtype is not None:
            shape = (spec.num_layers, spec.num_kv_heads, context_length, spec.head_dim)
            self.register_buffer("key_cache", torch.zeros(shape, dtype=cache_dtype), persistent=False)
            self.register_buffer("value_cache", torch.zeros(shape, dtype=cache_dtype), persistent=False)

    def hidden(self, input_ids: torch.Tensor, position: torch.Tensor, use_cache: bool,
               length: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [1, T, hidden] of tokens at positions position[0] + 0..T-1.

        With the cache, keys are the whole buffer (this chunk written in place first); without,
        only the chunk itself. `length` masks keys at or beyond it (pooling over a padded chunk)."""
        spec = self.spec
        t = input_ids.shape[1]
        start = position[0]
        positions = start + torch.arange(t, dtype=torch.int32)  # [T]
        keys = torch.arange(self.context_length if use_cache else t, dtype=torch.int32)
        key_positions = keys if use_cache else positions
        delta = positions[:, None] - key_positions[None, :]  # query position - key position
        valid = delta >= 0
        if length is not None:
            valid = valid & (keys[None, :] < length[0])
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(spec.windows):
            allowed = valid if window is None else valid & (delta < window)
            masks[window] = torch.where(allowed, 0.0, MASKED)[None, None].float()
        x = self.model.embed_tokens(input_ids)
        if spec.gemma:
            x = x * torch.tensor(spec.hidden_size ** 0.5, dtype=x.dtype)
        x = x.float()
        tables = []
        for index in range(len(self.layer_types)):
            cos, sin = getattr(self, f"rope_cos_{index}"), getattr(self, f"rope_sin_{index}")
            tables.append((cos[positions][None, None], sin[positions][None, None]))
        for index, layer in enumerate(self.model.layers):
            cos, sin = tables[self.layer_types.index(spec.layer_types[index])]
            cache = (self.key_cache, self.value_cache, index, start) if use_cache else None
            x = layer(x, cos, sin, masks[spec.windows[index]], cache)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        if self.spec.final_softcap:
            out = torch.tanh(out / self.spec.final_softcap) * self.spec.final_softcap
        return out

    def reset_cache(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()


# --------------------------------------------------------------------------------------------
# The functions the package exposes, as modules torch.jit.trace can take one at a time


class Step(nn.Module):
    """prefill (T = chunk) and decode (T = 1): write the chunk's keys and values into the cache at
    `position`, return the logits of the last real token (index length - 1), [1, 1, vocab]."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        # The decoder's own cache tensors, registered here too so that they are named `key_cache` and
        # `value_cache` at the top (coremltools matches StateType names against named_buffers()).
        self.register_buffer("key_cache", decoder.key_cache, persistent=False)
        self.register_buffer("value_cache", decoder.value_cache, persistent=False)
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.decoder.hidden(input_ids, position, use_cache=True)
        if length is not None:
            hidden = hidden.index_select(1, (length - 1).to(torch.int32))
        return self.decoder.logits(hidden)


class Embed(nn.Module):
    """Mean of the final hidden states over the first `length` tokens, L2-normalised, [1, hidden]."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        zero = torch.zeros(1, dtype=torch.int32)
        hidden = self.decoder.hidden(input_ids, zero, use_cache=False, length=length)  # [1, T, H]
        keep = (torch.arange(t, dtype=torch.int32) < length[0]).float()[None, :, None]
        pooled = (hidden * keep).sum(1) / length.float().clamp_min(1.0)
        return l2_normalize(pooled)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / |x| without squaring large values: scaled by the max magnitude first (float16-safe)."""
    peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    scaled = x / peak
    return scaled / torch.sqrt(scaled.pow(2).sum(-1, keepdim=True)).clamp_min(1e-6)


# --------------------------------------------------------------------------------------------
# Loading


def hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{model_dir} has no *.safetensors weights", path=str(model_dir))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def load_decoder(model_dir: Path, context_length: int, cache_dtype: torch.dtype | None = None,
                 state: dict[str, torch.Tensor] | None = None, spec: DecoderSpec | None = None) -> Decoder:
    """The decoder in float32 with the checkpoint's weights (or `state`, e.g. decompressed ones)."""
    spec = spec or read_spec(model_dir)
    state = dict(state if state is not None else hf_state_dict(model_dir))
    if spec.tied and "model.embed_tokens.weight" in state:  # one tensor under both names, as the module ties them
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    biases = {k.split(".")[-2] for k in state if k.endswith(".bias")}
    decoder = Decoder(spec, context_length, biases, cache_dtype)
    ours = set(decoder.state_dict())
    missing, unexpected = sorted(ours - set(state)), sorted(set(state) - ours)
    if missing or unexpected:
        raise UnsupportedModel(f"the checkpoint does not match {spec.architecture} as the Core ML export reads it: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}", missing=missing[:20],
                               unexpected=unexpected[:20])
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return decoder.float().eval()


def perplexity_and_logits(decoder: Decoder, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Perplexity of `ids` under the decoder (no cache, one pass) and its logits [T, vocab]."""
    with torch.no_grad():
        tokens = torch.tensor([ids], dtype=torch.int32)
        logits = decoder.logits(decoder.hidden(tokens, torch.zeros(1, dtype=torch.int32), use_cache=False))[0]
        loss = F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="mean")
    return float(math.exp(loss)), logits
