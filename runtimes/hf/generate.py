"""Token-by-token decoding on a transformers model with a KV cache, cheaper per step than model.generate."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from runtimes.text import Sampling
from runtimes.hf.sampling import choose_token


def stream_token_ids(model: Any, prompt_ids: list[int], sampling: Sampling, max_tokens: int, device: str,
                     cancelled: threading.Event | None = None) -> Iterator[int]:
    """Yield generated ids one by one; the caller decides when to stop (EOS, stop strings, cancel)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    history = list(prompt_ids)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        for step in range(1, max_tokens + 1):
            token = choose_token(out.logits[0, -1].to("cpu"), history, sampling, generator)
            yield token
            if step == max_tokens or (cancelled is not None and cancelled.is_set()):
                return  # no forward pass for a token nobody will read
            history.append(token)
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                        use_cache=True)
