"""Attention confined to each example of a packed row, so packing costs no cross-example compute.

Registered with transformers' AttentionInterface under PACKED_ATTENTION. The model's forward is
given `packed_segments` ([start, end) per example); transformers hands unknown keyword arguments
down to the attention function, and since no mask function is registered under this name it
builds no O(length^2) mask either. Each segment runs PyTorch's causal scaled-dot-product
attention (flash kernel on CPU and CUDA), with grouped-query heads shared natively.
"""

from __future__ import annotations

from typing import Any

PACKED_ATTENTION = "sidecar_packed"
_registered = False


def packed_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    import torch.nn.functional as F

    segments = kwargs.get("packed_segments")
    if segments is None:  # a plain unpadded batch (e.g. one sequence): causal over the whole row
        segments = [(0, query.shape[2])]
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        for s, e in segments
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        _registered = True
    return PACKED_ATTENTION
