"""Cross-entropy through the output layer without materialising the logits of a whole batch.

A 49k-token vocabulary makes the logits of a 2,000-token micro-batch ~400 MB in float32, plus the
same again for their gradient and the softmax autograd keeps. Only positions that carry a loss
reach this function (prompt tokens never get logits), and they are processed in chunks whose
gradients are computed on the spot in the forward pass and replayed in backward, so peak memory
is one chunk's logits. The arithmetic is the usual one: d loss / d logits = softmax - one_hot.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_ROWS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            if bias is not None:
                logits += bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight or need_bias:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(t.shape[0]), t] -= 1.0
                probs = probs.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk] = probs @ weight
                if need_weight:
                    grad_weight.addmm_(probs.t().float(), h.float())
                if need_bias:
                    grad_bias += probs.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_output if present else None for present in ctx.present]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.weight_dtype)
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.weight_dtype)
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                             chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T + bias, targets), in float32."""
    if hidden.shape[0] == 0:  # still touch every input, so DDP sees each parameter used
        return (hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)) * 0.0
    if not torch.is_grad_enabled():  # evaluation: the loss alone, no gradient work
        return sum((_chunk_loss(hidden[i:i + chunk], weight, bias, targets[i:i + chunk]) for i in range(0, hidden.shape[0], chunk)),
                   hidden.new_zeros((), dtype=torch.float32))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    if bias is not None:
        logits += bias.float()
    return (torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)).sum()
