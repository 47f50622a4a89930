"""An exported graph measured against the torch model it came from, through onnxruntime.

Decoder: a batch with one left-padded row, first with an empty past (the first call a host makes),
then continued with the past onnxruntime itself returned; logits compared at the real positions.
Encoder: real texts through the model's own tokenizer, padded; last_hidden_state at the real tokens
and sentence_embedding by cosine. The bars (float32): logits within 1e-4, cosine >= 0.9999.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOGITS_TOLERANCE = 1e-4
COSINE_FLOOR = 0.9999
TEXTS = ["The quick brown fox jumps over the lazy dog.", "ONNX Runtime runs this graph.",
         "A much longer sentence, with punctuation, numbers like 1234 and 5.67, and several clauses to pad the batch.",
         "short"]


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def empty_past(sess: Any, batch: int) -> dict[str, Any]:
    """Zero-length past tensors for every past_key_values input, shaped from the graph."""
    import numpy as np

    feeds = {}
    for value in sess.get_inputs():
        if value.name.startswith("past_key_values."):
            heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return feeds


def positions(mask: Any) -> Any:
    """position_ids from an attention mask, as transformers' generate makes them (left padding at 1)."""
    import numpy as np

    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def presents_to_past(names: list[str], outputs: list[Any]) -> dict[str, Any]:
    return {name.replace("present.", "past_key_values.", 1): value
            for name, value in zip(names, outputs) if name.startswith("present.")}


def check_decoder(model: Any, onnx_path: Path, *, threads: int | None = None) -> dict[str, Any]:
    """Measured drift of the decoder graph against torch; `passed` applies the float32 bar."""
    import numpy as np
    import torch

    sess = session(onnx_path, threads)
    names = [o.name for o in sess.get_outputs()]
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(0, vocab, (2, 7), generator=generator)
    more = torch.randint(0, vocab, (2, 3), generator=generator)
    mask1 = torch.ones_like(first)
    mask1[1, :2] = 0  # left padding on the second row
    mask2 = torch.cat([mask1, torch.ones_like(more)], dim=1)
    pos1 = torch.from_numpy(positions(mask1.numpy()))
    pos2 = torch.from_numpy(positions(mask2.numpy())[:, -more.shape[1]:].copy())
    with torch.no_grad():
        ref1 = model(input_ids=first, attention_mask=mask1, position_ids=pos1, use_cache=True)
        cache = getattr(ref1, "cache", None) or ref1["past_key_values"]
        cache_arg = "cache" if hasattr(ref1, "cache") else "past_key_values"
        logits1 = ref1.logits.numpy().copy()
        ref2 = model(input_ids=more, attention_mask=mask2, position_ids=pos2, use_cache=True, **{cache_arg: cache})
        logits2 = ref2.logits.numpy()

    feeds = {"input_ids": first.numpy(), "attention_mask": mask1.numpy(), "position_ids": pos1.numpy(), **empty_past(sess, 2)}
    out1 = sess.run(None, feeds)
    feeds = {"input_ids": more.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy(),
             **presents_to_past(names, out1)}
    out2 = sess.run(None, feeds)
    real = mask1.numpy().astype(bool)
    no_past = float(np.abs(out1[0] - logits1)[real].max())
    with_past = float(np.abs(out2[0] - logits2).max())
    top1 = float(np.mean(np.concatenate([(out1[0].argmax(-1) == logits1.argmax(-1))[real].ravel(),
                                         (out2[0].argmax(-1) == logits2.argmax(-1)).ravel()])))
    worst = max(no_past, with_past)
    return {"kind": "decoder", "logits_max_abs_diff_no_past": no_past, "logits_max_abs_diff_with_past": with_past,
            "logits_scale": float(np.abs(logits1[real]).max()), "top1_agreement": top1,
            "tolerance": LOGITS_TOLERANCE, "passed": worst <= LOGITS_TOLERANCE,
            "cases": "batch 2 (one row left-padded), 7 tokens with an empty past, then 3 more with the returned past"}


def check_encoder(model: Any, tokenizer: Any, onnx_path: Path, pooling: str, *, threads: int | None = None) -> dict[str, Any]:
    import numpy as np
    import torch

    from runtimes.hf.embeddings import pool_hidden

    sess = session(onnx_path, threads)
    wanted = {i.name for i in sess.get_inputs()}
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        hidden = model(**tensors).last_hidden_state
        vectors = torch.nn.functional.normalize(pool_hidden(hidden, tensors["attention_mask"], pooling), p=2, dim=1)
    ort_hidden, ort_vectors = sess.run(["last_hidden_state", "sentence_embedding"], feeds)
    real = feeds["attention_mask"].astype(bool)
    hidden_diff = float(np.abs(ort_hidden - hidden.numpy())[real].max())
    ref = vectors.numpy()
    cosine = np.sum(ref * ort_vectors, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(ort_vectors, axis=1))
    worst = float(cosine.min())
    return {"kind": "encoder", "cosine_min": worst, "hidden_max_abs_diff": hidden_diff, "pooling": pooling,
            "texts": len(TEXTS), "cosine_floor": COSINE_FLOOR, "passed": worst >= COSINE_FLOOR}
