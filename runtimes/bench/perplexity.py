"""Perplexity, computed the same way on every runtime from the engine's tokenizer and logits.

`sliding` (Hugging Face's "perplexity of fixed-length models"): windows of `context` tokens starting
every `stride` tokens; each window scores only the tokens the previous window did not reach, so every
token is scored at most once, with at least context - stride tokens of history before it (all but the
text's first token when stride < context; with stride = context a window's first token has no history
inside it and is not scored, as in Hugging Face's loop). (The loop in Hugging Face's guide weights each window's mean loss by trg_len - 1 tokens
while it averages over trg_len; here every token's negative log-likelihood is summed, once.)

`chunks` (llama-perplexity's default, tools/perplexity/perplexity.cpp): the text in non-overlapping
chunks of `context` tokens (the remainder dropped, at least two chunks), each evaluated from an empty
cache with its first token replaced by BOS when the vocabulary adds one, and only the second half
scored: positions context/2 .. context-2 predicting the next token.

The text is tokenized as llama-perplexity does (the vocabulary's BOS rule, special tokens not parsed).
Log-softmax in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Tick = Callable[[int, int], None]


class TextTooShort(Exception):
    error_kind = "dataset_invalid"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.error_detail = detail


def _nll(logits: Any, targets: list[int]) -> float:
    """Sum of -log softmax(logits[i])[targets[i]]."""
    import numpy as np

    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return float((log_z - x[np.arange(len(targets)), targets]).sum())


def sliding(engine: Any, ids: list[int], context: int, stride: int, tick: Tick) -> dict[str, Any]:
    if len(ids) < 2:
        raise TextTooShort(f"the text has {len(ids)} tokens; perplexity needs at least 2", tokens=len(ids))
    starts = list(range(0, len(ids), stride))
    nll, scored, prev_end = 0.0, 0, 0
    for index, begin in enumerate(starts):
        end = min(begin + context, len(ids))
        first_target = max(prev_end, begin + 1)  # absolute index of the first token this window scores
        if end > first_target:
            window = ids[begin:end]
            logits = engine.logits(window, first_target - 1 - begin)[: end - first_target]
            nll += _nll(logits, ids[first_target:end])
            scored += end - first_target
        prev_end = end
        tick(index + 1, len(starts))
        if end == len(ids):
            break
    return _result("sliding", context, stride, len(ids), scored, nll)


def chunks(engine: Any, ids: list[int], context: int, tick: Tick) -> dict[str, Any]:
    if len(ids) < 2 * context:
        raise TextTooShort(f"the text has {len(ids)} tokens; the chunks method needs at least 2 x context = {2 * context}",
                           tokens=len(ids), needed=2 * context)
    n_chunks = len(ids) // context
    first = context // 2
    nll, scored = 0.0, 0
    for chunk in range(n_chunks):
        window = list(ids[chunk * context:(chunk + 1) * context])
        targets = window[first + 1:]
        if engine.add_bos:
            window[0] = engine.bos
        logits = engine.logits(window, first)[: context - 1 - first]
        nll += _nll(logits, targets)
        scored += context - 1 - first
        tick(chunk + 1, n_chunks)
    return _result("chunks", context, None, len(ids), scored, nll)


def _result(method: str, context: int, stride: int | None, tokens: int, scored: int, nll: float) -> dict[str, Any]:
    mean = nll / scored
    return {"method": method, "context": context, "stride": stride, "tokens": tokens, "scored": scored,
            "nll": round(mean, 6), "ppl": round(math.exp(mean), 6)}


def measure(engine: Any, text: str, method: str, context: int, stride: int, max_tokens: int | None, tick: Tick) -> dict[str, Any]:
    ids = engine.tokenize(text)
    if max_tokens:
        ids = ids[:max_tokens]
    if method == "chunks":
        return chunks(engine, ids, context, tick)
    return sliding(engine, ids, context, stride, tick)
