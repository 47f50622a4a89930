"""Next-token choice on torch logits, in llama.cpp's order: repeat penalty, top-k, temperature, top-p, min-p."""

from __future__ import annotations

from typing import Any

from runtimes.text import Sampling


def apply_repeat_penalty(logits: Any, history: list[int], sampling: Sampling) -> Any:
    """llama.cpp's rule: divide positive logits, multiply negative ones, for recently seen tokens."""
    import torch

    if sampling.repeat_penalty == 1.0 or not history or sampling.repeat_last_n == 0:
        return logits
    window = history if sampling.repeat_last_n < 0 else history[-sampling.repeat_last_n:]
    ids = torch.tensor(sorted(set(window)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / sampling.repeat_penalty, picked * sampling.repeat_penalty)
    return logits


def choose_token(logits: Any, history: list[int], sampling: Sampling, generator: Any) -> int:
    """One token id from a 1-D logits vector."""
    import torch

    logits = apply_repeat_penalty(logits.float(), history, sampling)
    if sampling.greedy:
        return int(torch.argmax(logits))
    if 0 < sampling.top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, sampling.top_k)
    else:
        values, indices = torch.sort(logits, descending=True)
    probs = torch.softmax(values / sampling.temperature, dim=-1)
    keep = probs.shape[-1]
    if sampling.top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        keep = min(keep, int(torch.searchsorted(cumulative, torch.tensor([sampling.top_p], device=probs.device))) + 1)
    if sampling.min_p > 0:
        keep = min(keep, max(1, int((probs >= sampling.min_p * probs[0]).sum())))
    probs = probs[:keep]
    choice = torch.multinomial(probs / probs.sum(), 1, generator=generator)
    return int(indices[choice])
