"""The accuracy cost of a compressed export, measured on Linux where Core ML cannot run.

The compressed package's weights are decompressed by coremltools (spec.weights), loaded back into
the torch export module and run on a fixed text next to the same module holding the uncompressed
export's weights (the checkpoint rounded to float16, which is what a float16 package holds): the
largest logit difference and both perplexities. Both run in float32, so the numbers isolate the
compression from the device's float16 arithmetic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from runtimes.tiny import CORPUS_PATH, STORY_SEPARATOR

MAX_TOKENS = 128


def probe_text(model_dir: Path, limit: int) -> tuple[str | None, list[int]]:
    """A few stories of the bundled CC0 corpus as token ids (at most `limit`); random ids when the
    model has no tokenizer (the text is then None)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer files: the logit comparison still holds
        rng = random.Random(0)
        from runtimes.coreml.decoder import read_spec

        vocab = read_spec(model_dir).vocab_size
        return None, [rng.randrange(vocab) for _ in range(limit)]
    text = STORY_SEPARATOR.join(CORPUS_PATH.read_text(encoding="utf-8").split(STORY_SEPARATOR)[:3])
    ids = tokenizer(text)["input_ids"][:limit]
    return tokenizer.decode(ids, skip_special_tokens=True), ids


def accuracy(model_dir: Path, package: Path, context_length: int, model_spec: Any = None) -> dict[str, Any]:
    """Compare one compressed function package (single-function: decompress_weights' condition)
    with the uncompressed weights, on the probe text."""
    import torch

    from runtimes.coreml import spec
    from runtimes.coreml.decoder import hf_state_dict, load_decoder, perplexity_and_logits

    state = hf_state_dict(model_dir)
    base = {name: tensor.to(torch.float16).float() for name, tensor in state.items()}
    unpacked = spec.weights(package)
    names = spec.parameter_names(unpacked, base)
    compressed = dict(base)
    for const, name in names.items():
        value = torch.from_numpy(unpacked[const].astype("float32")).reshape(base[name].shape)
        compressed[name] = value
    matrices = [name for name, tensor in base.items() if tensor.dim() >= 2]
    missing = sorted(set(matrices) - set(names.values()) - {"lm_head.weight"})
    text, ids = probe_text(model_dir, min(MAX_TOKENS, context_length))
    with torch.no_grad():
        ppl_base, logits_base = perplexity_and_logits(load_decoder(model_dir, context_length, state=base, spec=model_spec), ids)
        ppl, logits = perplexity_and_logits(load_decoder(model_dir, context_length, state=compressed, spec=model_spec), ids)
    diff = (logits - logits_base).abs()
    return {"logit_max_abs_diff": round(float(diff.max()), 6), "logit_mean_abs_diff": round(float(diff.mean()), 6),
            "perplexity": round(ppl, 4), "perplexity_base": round(ppl_base, 4), "tokens": len(ids), "text": text,
            "weights_from_package": sum(1 for n in names.values() if base[n].dim() >= 2), "matrices_not_found": missing,
            "method": "decompressed package weights in the torch export module (float32) against the float16 "
                      "export's weights, teacher-forced over the text"}


def encoder_accuracy(model_dir: Path, package: Path) -> dict[str, Any]:
    """For an encoder: the compressed package's weights against the float16 ones, as embeddings of
    the probe sentences (cosine similarity and the largest component difference)."""
    import torch

    from runtimes.coreml import spec
    from runtimes.coreml.decoder import hf_state_dict
    from runtimes.coreml.encoder import load_encoder

    state = hf_state_dict(model_dir)
    base = {name: tensor.to(torch.float16).float() for name, tensor in state.items()}
    unpacked = spec.weights(package)
    names = spec.parameter_names(unpacked, base)
    compressed = dict(base)
    for const, name in names.items():
        compressed[name] = torch.from_numpy(unpacked[const].astype("float32")).reshape(base[name].shape)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    sentences = [s.strip() for s in CORPUS_PATH.read_text(encoding="utf-8").split(".") if s.strip()][:8]
    ours, theirs = load_encoder(model_dir, compressed), load_encoder(model_dir, base)
    cosines, diffs = [], []
    with torch.no_grad():
        for sentence in sentences:
            ids = torch.tensor([tokenizer(sentence)["input_ids"][:128]], dtype=torch.int32)
            length = torch.tensor([ids.shape[1]], dtype=torch.int32)
            a, b = ours(ids, length)[0], theirs(ids, length)[0]
            cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            diffs.append(float((a - b).abs().max()))
    return {"cosine_min": round(min(cosines), 6), "embedding_max_abs_diff": round(max(diffs), 6),
            "sentences": len(sentences), "text": sentences[0],
            "weights_from_package": sum(1 for n in names.values() if base[n].dim() >= 2),
            "method": "decompressed package weights in the torch export module (float32) against the float16 "
                      "export's weights, on sentences of the bundled corpus"}
