"""Check a merged model against its recipe: the base with the same adapters attached unmerged.

Both run in transformers, in float32 on the CPU, on a few fixed probe prompts; the largest
absolute difference of their logits is the verdict. The unmerged side is the mechanism `generate`
uses for `adapters` (runtimes/hf/adapters.py), so a merge that passes answers like the adapters
did. The two models are loaded one after the other, never together: memory is one float32 copy
of the model (twice the file for a bfloat16 checkpoint) plus the adapters.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel

PROBES = (
    "The quick brown fox jumps over the lazy dog because",
    "Question: what is the capital of France?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In autumn, the leaves in the village turn red and gold, and the children",
)
# Largest absolute logit difference accepted, relative to the largest logit (never below 1e-4), by
# the dtype of the merged weights. float32 differs from the unmerged forward by rounding alone; a
# 16-bit merge also by rounding each merged weight to 16 bits, which the reference (base weights as
# stored, adapters in float32) never does: about 8 units in the last place of the largest logit.
ABSOLUTE_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = {"f32": 1e-5, "f64": 1e-5, "f16": 8 * 2.0**-10, "bf16": 8 * 2.0**-7}


class VerificationFailed(Exception):
    error_kind = "verification_failed"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.error_detail = detail


def verify_merge(base_dir: Path, adapters: Sequence[tuple[Path, float]], merged_dir: Path, *, dtype: str,
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 check_cancelled: Callable[[], None] | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """{probes, max_abs_logit_diff, dtype: "float32", tolerance}; raises VerificationFailed above the
    tolerance for `dtype` (the merged weights' dtype: f32, f16 or bf16)."""
    check = check_cancelled or (lambda: None)
    probes = _probe_ids(merged_dir, trust_remote_code)
    if progress:
        progress(0, 2, f"running {len(probes)} probes on the base with the adapters unmerged")
    reference = _logits(base_dir, probes, adapters, allow_pickle, trust_remote_code)
    check()
    if progress:
        progress(1, 2, "running the probes on the merged model")
    merged = _logits(merged_dir, probes, (), False, trust_remote_code)
    check()
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, merged))
    scale = max(float(a.abs().max()) for a in reference)
    tolerance = max(ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE[dtype] * scale)
    result = {"probes": len(probes), "max_abs_logit_diff": diff, "dtype": "float32", "tolerance": tolerance}
    if progress:
        progress(2, 2, f"largest logit difference {diff:.3g} (tolerance {tolerance:.3g})")
    if not math.isfinite(diff) or diff > tolerance:
        raise VerificationFailed(
            f"the merged model's logits differ from the base with the adapters unmerged by up to {diff:.3g} "
            f"(tolerance {tolerance:.3g} for {dtype}); nothing was registered. This is a bug, or an adapter peft "
            "runs differently from how it merges: report it, and use the adapters unmerged meanwhile",
            **result)
    return result


def _probe_ids(model_dir: Path, trust_remote_code: bool) -> list[list[int]]:
    """The probe texts in the model's own tokenizer; fixed token ids when it has none."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
        probes = [list(tokenizer(text)["input_ids"]) for text in PROBES]
        if all(probes):
            return probes
    except (OSError, ValueError, KeyError, TypeError):
        pass
    vocab = int(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("vocab_size") or 256)
    return [[(7919 * (i + 1) * (j + 3)) % vocab for j in range(16)] for i in range(len(PROBES))]


def _logits(model_dir: Path, probes: list[list[int]], adapters: Sequence[tuple[Path, float]], allow_pickle: bool,
            trust_remote_code: bool) -> list[Any]:
    import torch
    import transformers

    from runtimes.hf.adapters import AdapterManager

    transformers.utils.logging.disable_progress_bar()
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=not allow_pickle or None,
                                     trust_remote_code=trust_remote_code, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"transformers cannot load {model_dir} to verify the merge ({exc}); pass verify: false "
                               "to skip the check", path=str(model_dir)) from None
    try:
        manager = AdapterManager(model) if adapters else None
        outputs = []
        with torch.no_grad(), manager.activated(list(adapters)) if manager else nullcontext():
            for ids in probes:
                out = model(torch.tensor([ids]))
                outputs.append((out.logits if causal else out.last_hidden_state)[0].float().clone())
        return outputs
    finally:
        del model
        gc.collect()
