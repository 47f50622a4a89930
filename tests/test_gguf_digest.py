"""The sha256 made while a GGUF is written (runtimes/gguf/digest.py): right, or None, never wrong.

A writer thread here does what llama.cpp's quantizer does: a placeholder header, the data in
pieces, the real header last. tests/test_gguf_quantize.py checks the digest of every real
quantization type against the finished file.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from runtimes.gguf import digest as digest_module
from runtimes.gguf.digest import FollowingDigest, predict_header

HEADER = b"GGUF" + bytes(range(60)) * 3
DATA = [os.urandom(300_000) for _ in range(12)]


def write_like_llama_cpp(path: Path, header: bytes = HEADER, pause_s: float = 0.002) -> None:
    with open(path, "wb") as handle:
        handle.write(bytes(len(header)))
        for piece in DATA:
            handle.write(piece)
            handle.flush()
            time.sleep(pause_s)
        handle.seek(0)
        handle.write(header)


def follow(path: Path, plan, header: bytes = HEADER) -> str | None:
    follower = FollowingDigest(path)
    follower.start(plan)
    write_like_llama_cpp(path, header)
    return follower.finish()


def test_the_digest_is_the_finished_file_s(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    made = follow(out, lambda: HEADER)
    assert made == hashlib.sha256(out.read_bytes()).hexdigest()


def test_a_header_other_than_predicted_gives_none(tmp_path: Path) -> None:
    wrong = HEADER[:-1] + b"\x00"
    assert follow(tmp_path / "model.gguf", lambda: wrong) is None


def test_a_plan_that_gives_up_gives_none(tmp_path: Path) -> None:
    assert follow(tmp_path / "model.gguf", lambda: None) is None


def test_a_plan_that_fails_gives_none(tmp_path: Path) -> None:
    def broken() -> bytes:
        raise RuntimeError("no gguf symbols in this build")

    assert follow(tmp_path / "model.gguf", broken) is None


def test_a_stalled_follower_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digest_module, "STALL_S", 0.02)
    release = threading.Event()

    def slow() -> bytes:
        release.wait(10)
        return HEADER

    try:
        assert follow(tmp_path / "model.gguf", slow) is None
    finally:
        release.set()


def test_a_file_that_exists_already_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old contents")
    assert follow(out, lambda: HEADER) is None


def test_predicted_header_is_llama_cpp_s(tiny_path: Path, tmp_path: Path) -> None:
    """The prediction alone, against the header of a real quantization of builtin:tiny."""
    import ctypes

    import llama_cpp

    from runtimes.gguf.export import convert_to_gguf
    from runtimes.gguf.quantize import QUANT_TYPES, _Log, _LogRouter, _restore_default_log

    source, out = tmp_path / "tiny.F16.gguf", tmp_path / "tiny.Q8_0.gguf"
    convert_to_gguf(tiny_path, source, dtype="f16")
    router = _LogRouter()
    logs = []
    callback = llama_cpp.llama_log_callback(router.feed)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        for dry_run, target in ((True, tmp_path / "unused.gguf"), (False, out)):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.dry_run = QUANT_TYPES["Q8_0"], dry_run
            logs.append(router.register(_Log()))
            assert llama_cpp.llama_model_quantize(bytes(source), bytes(target), ctypes.byref(params)) == 0
    finally:
        _restore_default_log(llama_cpp)
    plan = logs[0].planned()
    assert len(plan) == 21 and ("token_embd.weight", "q8_0") in plan and ("output_norm.weight", "f32") in plan
    header = predict_header(source, plan, QUANT_TYPES["Q8_0"])
    assert header is not None and out.read_bytes()[:len(header)] == header
    assert not (tmp_path / "unused.gguf").exists()  # a dry run writes nothing


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread nice values are Linux's")
def test_lowest_priority_is_the_calling_thread_s_alone() -> None:
    from runtimes.gguf.digest import lowest_priority

    seen: dict[str, int] = {}

    def lowered() -> None:
        lowest_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen["thread"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller's is unchanged
