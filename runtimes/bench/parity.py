"""Golden-transcript parity: how closely a model follows the reference model's greedy transcripts.

The reference tokenizes each prompt and decodes `tokens` tokens greedily: that is the transcript.
Every model is then fed the reference's prompt ids (so a tokenizer difference cannot hide in the
numbers; whether its own tokenizer agrees is reported as `same_prompt_tokens`) and measured twice:
- free-running: its own greedy decode of the same length; `first_divergence` is the index of the first
  token that differs from the transcript (None when all agree);
- teacher-forced: one pass over prompt + transcript; `top1_agreement` is the fraction of the
  transcript's tokens that are the model's top-1 prediction at their position, so a single early
  divergence does not hide how close the rest is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Tick = Callable[[int, int], None]


def transcripts(engine: Any, prompts: list[str], tokens: int, tick: Tick) -> list[dict[str, Any]]:
    out = []
    for index, prompt in enumerate(prompts):
        ids = engine.tokenize_prompt(prompt)
        out.append({"prompt_ids": ids, "tokens": engine.greedy(ids, tokens)})
        tick(index + 1, len(prompts))
    return out


def compare(engine: Any, prompts: list[str], golden: list[dict[str, Any]], reference: str, tick: Tick) -> dict[str, Any]:
    import numpy as np

    rows = []
    for index, (prompt, entry) in enumerate(zip(prompts, golden)):
        ids, ref = list(entry["prompt_ids"]), list(entry["tokens"])
        own = engine.greedy(ids, len(ref))
        divergence = next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b), None)
        logits = engine.logits(ids + ref, len(ids) - 1)[: len(ref)]
        agreement = float(np.mean(np.argmax(logits, axis=1) == np.asarray(ref))) if ref else 1.0
        rows.append({"prompt": index, "tokens": len(ref), "first_divergence": divergence,
                     "top1_agreement": round(agreement, 6), "same_prompt_tokens": engine.tokenize_prompt(prompt) == ids})
        tick(index + 1, len(prompts))
    return {"reference": reference, "prompts": rows, "identical": sum(r["first_divergence"] is None for r in rows),
            "mean_top1_agreement": round(float(np.mean([r["top1_agreement"] for r in rows])), 6) if rows else 1.0}
