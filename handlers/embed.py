"""embed: sentence embeddings from a pooled encoder or decoder model, on transformers or llama.cpp.

Results that would not fit in one message (maxMessageBytes) are written to a .npy file whose path is
returned instead, atomically, under the home directory's outputs/.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from pathlib import Path
from typing import Any

from handlers.blocking import run_to_completion
from handlers.context import Context
from handlers.models import acquire_model
from protocol import messages as m
from protocol.errors import RpcError
from runtimes import cpu_share

LLAMA_POOLING = {None: -1, "mean": 1, "cls": 2, "last": 3}
FLOAT_JSON_BYTES = 24  # a float32 printed as a double, with its comma
ENVELOPE_SLACK = 1 << 16


def texts_of(params: m.EmbedParams) -> list[str]:
    texts = [params.input] if isinstance(params.input, str) else list(params.input)
    if not texts:
        raise RpcError.invalid_params("params.input", "give at least one text")
    if params.batch_size < 1:
        raise RpcError.invalid_params("params.batch_size", "must be at least 1")
    return texts


def encoded_size(count: int, dimensions: int, encoding: str) -> int:
    per_value = 16 / 3 if encoding == "base64" else FLOAT_JSON_BYTES
    return int(count * dimensions * per_value)


def write_npy(home: Path, vectors: Any) -> Path:
    """Atomically, so no reader ever sees half a file and a full disk leaves nothing behind."""
    import numpy as np

    from runtimes.files import atomic_file

    final = home / "outputs" / f"embeddings-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.npy"
    with atomic_file(final) as handle:
        np.save(handle, vectors)
    return final


def encode_vectors(vectors: Any, encoding: str) -> list:
    import numpy as np

    if encoding == "base64":
        little = vectors.astype("<f4", copy=False)
        return [base64.b64encode(np.ascontiguousarray(row).tobytes()).decode("ascii") for row in little]
    return vectors.tolist()


def embed_on_free_cores(model: Any, texts: list[str], **options: Any) -> tuple[Any, int, str]:
    """On the engine thread: as many threads as the cores other programs leave us (runtimes/cpu_share.py)."""
    with cpu_share.job(getattr(model, "fixed_threads", None)) as share:
        share.apply_to(model)
        return model.embed(texts, **options)


async def embed(params: m.EmbedParams, ctx: Context) -> m.EmbedResult:
    started = time.perf_counter()
    texts = texts_of(params)

    def llama_embedding_mode(runtime: str) -> dict:
        """llama.cpp needs embedding mode and pooling at load time: a pool entry of its own."""
        return {"embedding": True, "pooling_type": LLAMA_POOLING[params.pooling]} if runtime == "llama.cpp" else {}

    lease = await acquire_model(ctx, params.model, params.runtime, params.options, params.keep_alive, llama_embedding_mode)
    load_ms = (time.perf_counter() - started) * 1000
    model = lease.model
    try:
        async with lease.entry.lock:
            compute_started = time.perf_counter()
            vectors, tokens, pooling = await run_to_completion(
                ctx, lease.entry.engine, embed_on_free_cores, model, texts, pooling=params.pooling, normalize=params.normalize, truncate=params.truncate,
                batch_size=params.batch_size, cancelled=ctx.cancelled)
            ctx.check_cancelled({"done": len(texts)})
            compute_ms = (time.perf_counter() - compute_started) * 1000
    finally:
        lease.release()
    count, dimensions = vectors.shape
    path = None
    embeddings: list | None
    if encoded_size(count, dimensions, params.encoding) + ENVELOPE_SLACK > ctx.services.config.max_message_bytes:
        path = str(await asyncio.to_thread(write_npy, ctx.services.config.home, vectors))
        embeddings = None
    else:
        embeddings = encode_vectors(vectors, params.encoding)
    return m.EmbedResult(params.model, model.runtime, int(dimensions), int(count), pooling, params.normalize, params.encoding,
                         embeddings, path, m.EmbedUsage(int(tokens)),
                         {"load_ms": round(load_ms, 3), "compute_ms": round(compute_ms, 3)})

