"""GGUF quantization through llama.cpp (runtimes/gguf/quantize.py), judged by llama.cpp itself.

Every type quantizes builtin:tiny and a small model whose dimensions are multiples of 256, and
the result loads in llama.cpp and generates. builtin:tiny's rows have 64 or 192 values, so
llama.cpp stores the K-quant tensors in fallback types (q4_K -> q5_0, ...): that is checked to be
reported, and the 256-wide model checks that the K types themselves are used where rows allow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from runtimes.gguf.export import convert_to_gguf
from runtimes.gguf.quantize import NEEDS_IMATRIX, QUANT_TYPES, QuantizeCancelled, QuantizeError, canonical_type, \
    quantize_gguf, tensor_types

PROMPTS = ["In autumn, the leaves in the village turn red and gold", "The moral of the story is that"]

# The tensor type each type's main tensors get when rows divide into 256 (llama.cpp's mixes).
K_MAIN = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
          "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
          "Q5_1": "Q5_1", "Q8_0": "Q8_0"}


def save_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **dims: Any) -> Path:
    """A random Llama with builtin:tiny's tokenizer (vocabulary 768): any dimensions, no download."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = dict(vocab_size=768, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **dims})).eval()
    model.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, out / item.name)
    return out


def llama(path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=256, verbose=False, seed=1, n_threads=1, n_threads_batch=1)


def greedy(llm: Any, prompt: str, count: int) -> list[int]:
    ids = llm.tokenize(prompt.encode(), add_bos=False)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == count:
            break
    return out


@pytest.fixture(scope="module")
def tiny_f16(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.F16.gguf"
    convert_to_gguf(tiny_path, out, dtype="f16")
    return out


@pytest.fixture(scope="module")
def wide_f16(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 256, ffn 512: every 2-D tensor's rows divide into K-quant blocks."""
    model = save_llama(tmp_path_factory.mktemp("wide"), tiny_path)
    out = model / "wide.F16.gguf"
    convert_to_gguf(model, out, dtype="f16")
    return out


def test_type_names() -> None:
    assert canonical_type("q4_k_m") == "Q4_K_M" and canonical_type(" Q8_0 ") == "Q8_0"
    with pytest.raises(ValueError, match="valid types: Q4_0, Q4_1") as unknown:
        canonical_type("Q7_X")
    for name in QUANT_TYPES:
        assert name in str(unknown.value)
    for name in ("iq2_xs", "IQ1_S", "Q2_K_S"):
        with pytest.raises(ValueError, match="importance matrix"):
            canonical_type(name)
    assert set(NEEDS_IMATRIX).isdisjoint(QUANT_TYPES)


def file_sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@pytest.fixture(autouse=True)
def patient_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest thread runs at the lowest priority; on a loaded test machine it may pause for longer
    than the sidecar waits for it (it then leaves the hashing to the registry). Here it is waited for."""
    monkeypatch.setattr("runtimes.gguf.digest.STALL_S", 5.0)


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_every_type_quantizes_tiny_loads_and_generates(tiny_f16: Path, tmp_path: Path, qtype: str) -> None:
    steps: list[tuple[int, int]] = []
    out = tmp_path / f"tiny.{qtype}.gguf"
    result = quantize_gguf(tiny_f16, out, qtype.lower(), threads=1, progress=lambda s, t, m: steps.append((s, t)))
    assert result["type"] == qtype and result["tensors"] == 21 and out.stat().st_size == result["bytes"]
    assert result["sha256"] == file_sha256(out)  # hashed while written, from the header llama.cpp's dry run predicts
    assert result["bytes"] < result["source_bytes"] or qtype in ("Q8_0", "Q6_K")
    assert steps[-1] == (21, 21) and all(a <= b for (a, _), (b, _) in zip(steps, steps[1:]))
    types = tensor_types(out)
    assert result["tensor_types"] == types  # the quantizer's own lines count what the loader reads, fallbacks included
    assert types["F32"] == 5  # norms stay f32
    if qtype.startswith(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")):
        # rows of 64/192 values: no K-quant block fits, so every 2-D tensor took a fallback type
        assert len(result["fallbacks"]) == 15 and not any(t.endswith("_K") for t in types)
    llm = llama(out)
    assert len(greedy(llm, PROMPTS[0], 8)) == 8


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_k_quants_are_used_where_rows_allow(wide_f16: Path, tmp_path: Path, qtype: str) -> None:
    out = tmp_path / f"wide.{qtype}.gguf"
    result = quantize_gguf(wide_f16, out, qtype, threads=1)
    assert result["fallbacks"] == [] and result["sha256"] == file_sha256(out)
    types = tensor_types(out)
    assert result["tensor_types"] == types
    assert types.get(K_MAIN[qtype], 0) >= 8, types  # most of the 15 matrices have the type's own format
    assert len(greedy(llama(out), PROMPTS[1], 8)) == 8


def test_work_alongside_runs_while_llama_cpp_quantizes_and_its_log_stays_whole(tiny_f16: Path, tmp_path: Path) -> None:
    from runtimes.gguf.quantize import inspect_gguf

    out = tmp_path / "tiny.Q4_K_M.gguf"
    result = quantize_gguf(tiny_f16, out, "Q4_K_M", alongside=lambda: inspect_gguf(tiny_f16, tensor_types=False))
    source = inspect_gguf(tiny_f16)
    assert result["alongside"].chat_template == source.chat_template and result["alongside"].eog_tokens == source.eog_tokens
    assert result["tensors"] == 21 and result["tensor_types"] == tensor_types(out)


def test_work_alongside_that_fails_fails_the_call_and_leaves_nothing(tiny_f16: Path, tmp_path: Path) -> None:
    def broken() -> None:
        raise ValueError("the vocabulary could not be read")

    out = tmp_path / "tiny.Q8_0.gguf"
    with pytest.raises(ValueError, match="could not be read"):
        quantize_gguf(tiny_f16, out, "Q8_0", alongside=broken)
    assert not out.exists()


def test_work_alongside_that_starves_is_done_by_the_caller(tiny_f16: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A nice-19 thread may starve on a busy machine and its nice value cannot be raised again: after the
    grace the caller runs the work itself."""
    monkeypatch.setattr("runtimes.gguf.quantize.ALONGSIDE_GRACE_S", 0.01)
    release, callers = threading.Event(), []

    def read() -> str:
        callers.append(threading.current_thread().name)
        if len(callers) == 1:
            release.wait(10)  # the background run, starved
        return "read"

    try:
        result = quantize_gguf(tiny_f16, tmp_path / "tiny.Q8_0.gguf", "Q8_0", threads=1, alongside=read)
    finally:
        release.set()
    assert result["alongside"] == "read" and callers == ["quantize-alongside", threading.current_thread().name]


def test_a_digest_given_up_on_keeps_the_log_callback_alive(tiny_f16: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest thread still planning when the quantization is done is given up on (the registry hashes the
    file instead); its llama.cpp calls may still log, so the callback they use must never be freed."""
    import time

    import runtimes.gguf.quantize as quantize_module

    real_predict = quantize_module.predict_header

    def slow_predict(*args: Any) -> bytes | None:
        time.sleep(0.5)
        return real_predict(*args)

    monkeypatch.setattr(quantize_module, "predict_header", slow_predict)
    monkeypatch.setattr("runtimes.gguf.digest.STALL_S", 0.01)
    kept = len(quantize_module._KEEP_ALIVE)
    result = quantize_gguf(tiny_f16, tmp_path / "tiny.Q8_0.gguf", "Q8_0", threads=1)
    assert result["sha256"] is None and len(quantize_module._KEEP_ALIVE) == kept + 1
    monkeypatch.setattr(quantize_module, "predict_header", real_predict)
    monkeypatch.setattr("runtimes.gguf.digest.STALL_S", 5.0)
    again = quantize_gguf(tiny_f16, tmp_path / "again.gguf", "Q8_0", threads=1)
    assert again["sha256"] == file_sha256(tmp_path / "again.gguf")


def test_q8_0_greedy_tokens_equal_f16(tiny_f16: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "tiny.Q8_0.gguf"
    quantize_gguf(tiny_f16, q8, "Q8_0", threads=1)
    f16_llm, q8_llm = llama(tiny_f16), llama(q8)
    for prompt in PROMPTS:
        assert greedy(q8_llm, prompt, 16) == greedy(f16_llm, prompt, 16)


def test_requantizing_is_refused_with_llama_cpp_reason(tiny_f16: Path, tmp_path: Path) -> None:
    q4 = tmp_path / "tiny.Q4_0.gguf"
    quantize_gguf(tiny_f16, q4, "Q4_0", threads=1)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_gguf(q4, tmp_path / "again.gguf", "Q4_K_M", threads=1)
    assert not (tmp_path / "again.gguf").exists()


def test_cancel_stops_waiting_and_removes_the_output(tiny_path: Path, tmp_path: Path) -> None:
    model = save_llama(tmp_path / "deep", tiny_path, hidden_size=128, intermediate_size=384, num_hidden_layers=24)
    source = tmp_path / "deep.F16.gguf"
    convert_to_gguf(model, source, dtype="f16")
    cancelled = threading.Event()
    cancelled.set()
    out = tmp_path / "deep.Q4_K_M.gguf"
    with pytest.raises(QuantizeCancelled):
        quantize_gguf(source, out, "Q4_K_M", threads=1, cancelled=cancelled, poll_s=0.001)
    assert not out.exists()
    # the abandoned C call keeps its log callback; a new call afterwards still works
    result = quantize_gguf(source, tmp_path / "after.gguf", "Q8_0", threads=1)
    assert result["tensors"] == 24 * 9 + 3


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    """A 200 KiB tmpfs: a real ENOSPC mid-write (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_enospc_and_leaves_nothing(tiny_f16: Path, small_tmpfs: Path) -> None:
    out = small_tmpfs / "tiny.Q8_0.gguf"  # 231 KiB does not fit in 200 KiB
    with pytest.raises(OSError) as error:
        quantize_gguf(tiny_f16, out, "Q8_0", threads=1)
    assert error.value.errno == 28
    assert list(small_tmpfs.iterdir()) == []
