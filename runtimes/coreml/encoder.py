"""An export-friendly BERT encoder for sentence embeddings, loading Hugging Face weights as they are.

The Core ML `embed` function of an encoder (BertModel: all-MiniLM-L6-v2 and the BERT family):
word + position (+ token type 0, as llama.cpp also assumes) embeddings, post-norm layers with
bidirectional attention over the first `length` tokens, then the pooling the sentence-transformers
files name (mean or CLS; mean without them) and, when they list a Normalize module (or without
them), L2 normalisation, all inside the graph. The input length is one of a few enumerated buckets
(ct.EnumeratedShapes), so short texts do not pay for the longest. LayerNorm is computed on the row
divided by its largest magnitude (the same value exactly) so float16 cannot overflow; the mask is
-1e4, as in the decoder. Parameter names are Hugging Face's; tests/test_coreml_export.py holds the
embeddings to sentence-transformers'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from runtimes.base import UnsupportedModel
from runtimes.coreml.decoder import MASKED, l2_normalize

ENCODERS = ("BertModel",)


@dataclass(frozen=True)
class EncoderSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    eps: float
    pooling: str  # mean | cls
    normalize: bool


def is_encoder(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    names = config.get("architectures") or []
    return (names[0] if names else {"bert": "BertModel"}.get(config.get("model_type"))) in ENCODERS


def read_encoder_spec(model_dir: Path) -> EncoderSpec:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModel("the Core ML encoder export supports BERT with gelu and absolute positions "
                               f"(this one: {config.get('hidden_act')}, {config.get('position_embedding_type')})")
    pooling, normalize = "mean", True
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        pooling_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
        if pooling_dir and (model_dir / pooling_dir / "config.json").is_file():
            settings = json.loads((model_dir / pooling_dir / "config.json").read_text(encoding="utf-8"))
            modes = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v]
            if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
                raise UnsupportedModel(f"pooling {modes} is not supported by the Core ML export (mean or cls)")
            pooling = "mean" if modes == ["pooling_mode_mean_tokens"] else "cls"
    return EncoderSpec(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                       num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                       intermediate_size=config["intermediate_size"], max_positions=config["max_position_embeddings"],
                       eps=config.get("layer_norm_eps", 1e-12), pooling=pooling, normalize=normalize)


class LayerNorm(nn.Module):
    """nn.LayerNorm's arithmetic on the row divided by its largest magnitude (float16-safe)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
        scaled = x / peak
        centered = scaled - scaled.mean(-1, keepdim=True)
        normed = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps / (peak * peak))
        return normed * self.weight + self.bias


class _Named(nn.Module):
    """A container whose attribute names reproduce Hugging Face's parameter paths."""


def _dense(inputs: int, outputs: int) -> nn.Linear:
    return nn.Linear(inputs, outputs)


class Layer(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.heads, self.hidden = spec.num_heads, spec.hidden_size
        self.attention = _Named()
        self.attention.self = _Named()
        self.attention.self.query, self.attention.self.key, self.attention.self.value = _dense(h, h), _dense(h, h), _dense(h, h)
        self.attention.output = _Named()
        self.attention.output.dense = _dense(h, h)
        self.attention.output.LayerNorm = LayerNorm(h, spec.eps)
        self.intermediate = _Named()
        self.intermediate.dense = _dense(h, spec.intermediate_size)
        self.output = _Named()
        self.output.dense = _dense(spec.intermediate_size, h)
        self.output.LayerNorm = LayerNorm(h, spec.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, d = self.hidden, self.hidden // self.heads  # Python ints; the length stays symbolic (-1)
        attn = self.attention.self
        split = lambda y: y.view(1, -1, self.heads, d).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(attn.query(x)), split(attn.key(x)), split(attn.value(x)), attn_mask=mask)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(out.transpose(1, 2).reshape(1, -1, h)))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class Encoder(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embeddings = _Named()
        self.embeddings.word_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embeddings.position_embeddings = nn.Embedding(spec.max_positions, spec.hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(2, spec.hidden_size)
        self.embeddings.LayerNorm = LayerNorm(spec.hidden_size, spec.eps)
        self.encoder = _Named()
        self.encoder.layer = nn.ModuleList(Layer(spec) for _ in range(spec.num_layers))

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """[1, hidden]: pooled over the first `length` tokens (and normalised, as the model says)."""
        t = input_ids.shape[1]
        positions = torch.arange(t, dtype=torch.int32)
        keep = positions < length[0]
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None] + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        mask = torch.where(keep, 0.0, MASKED)[None, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        if self.spec.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = (x * keep.float()[None, :, None]).sum(1) / length.float().clamp_min(1.0)
        return l2_normalize(pooled) if self.spec.normalize else pooled


class Embed(nn.Module):
    """The traced wrapper: parameters appear as `encoder_...` consts in the Core ML program."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, length)


def load_encoder(model_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Encoder:
    from runtimes.coreml.decoder import hf_state_dict

    spec = read_encoder_spec(model_dir)
    tensors = dict(state if state is not None else hf_state_dict(model_dir))
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()
               if not k.startswith(("pooler.", "bert.pooler.")) and not k.endswith("position_ids")}
    encoder = Encoder(spec)
    ours = set(encoder.state_dict())
    missing, unexpected = sorted(ours - set(tensors)), sorted(set(tensors) - ours)
    if missing or unexpected:
        raise UnsupportedModel(f"the checkpoint does not match BertModel as the Core ML export reads it: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
    encoder.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return encoder.float().eval()


def buckets(max_length: int) -> list[int]:
    """The enumerated sequence lengths: powers of two from 16, and the maximum itself."""
    sizes = [n for n in (16, 32, 64, 128, 256, 512, 1024, 2048) if n < max_length]
    return sizes + [max_length]


def convert_embed(encoder: Encoder, max_length: int) -> Any:
    import coremltools as ct
    import numpy as np

    sizes = buckets(max_length)
    example = (torch.zeros(1, sizes[-1], dtype=torch.int32), torch.tensor([sizes[-1]], dtype=torch.int32))
    with torch.no_grad():
        traced = torch.jit.trace(Embed(encoder).eval(), example, check_trace=False)
    shapes = ct.EnumeratedShapes(shapes=[[1, n] for n in sizes], default=[1, sizes[-1]])
    return ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=shapes, dtype=np.int32),
                                      ct.TensorType(name="length", shape=(1,), dtype=np.int32)],
                      outputs=[ct.TensorType(name="embedding", dtype=np.float32)],
                      minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                      convert_to="mlprogram", skip_model_load=True)
