"""GGUF quantization through llama.cpp's own quantizer (llama_model_quantize, via llama-cpp-python).

Why llama.cpp's and not ours: its per-tensor type mixes (Q4_K_M keeps attn_v and ffn_down at
higher precision in some layers, the output tensor at Q6_K, ...) and its block formats are what
every GGUF reader expects; re-implementing them would only drift from it.

How it runs: the C call blocks for the whole file and cannot be interrupted, so it runs in a
thread while the calling thread watches a cancel flag and reports progress. llama.cpp logs one
"[  i/  n] tensor-name ..." line per tensor; a log callback installed for the call turns those
into progress steps and collects its warnings (shape fallbacks) and its error message. On cancel
the caller stops waiting at once and removes the output; the abandoned C call keeps writing into
the removed file until the (worker) process exits, which frees it.

Shapes: the K-quant types work on blocks of 256 values per row and the others on 32. A tensor
whose rows do not divide into 256 (every 2-D tensor of builtin:tiny, whose rows have 64 or 192
values) is stored by llama.cpp in a fallback type instead: q4_K -> q5_0, q5_K -> q5_1,
q6_K -> q8_0, q2_K/q3_K -> q4_0. Such a file loads and runs; `fallbacks` counts those tensors.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel
from runtimes.gguf.digest import FollowingDigest, lowest_priority, predict_header

ProgressFn = Callable[[int, int, str], None]

# Type name -> llama_ftype (llama.h's LLAMA_FTYPE_MOSTLY_*), the types llama.cpp quantizes without
# an importance matrix.
QUANT_TYPES: dict[str, int] = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
# Types whose low-bit tensors llama.cpp refuses to make without an importance matrix.
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
                 "IQ4_NL", "IQ4_XS", "Q2_K_S")

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_TYPE_FIELD = re.compile(r"type =\s*([^\s,]+)")  # "[ 3/ 273] blk.0.attn_q.weight - [576, 576], type = f16, "
_PLANNED = re.compile(r"->.*\((\S+)\)\s*$")  # a dry run's "size =  0.63 MiB ->  0.22 MiB (q5_0)"; absent when kept
_CONVERTING = re.compile(r"converting to\s+([^\s.]+)")  # "converting to q4_K .. size = ..."; absent when kept as is
_FALLBACK_LINE = re.compile(r"^warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*"
                            r"falling back to\s+(\S+)")
_FAILED = "failed to quantize: "


class QuantizeError(Exception):
    """llama.cpp refused or failed; its own message is kept."""

    error_kind = "unsupported_model"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.error_detail = detail


class QuantizeCancelled(Exception):
    """The caller's cancel flag was set while llama.cpp was quantizing; the output is gone."""


def canonical_type(name: str) -> str:
    """'q4_k_m' -> 'Q4_K_M'. ValueError names the valid types (and says when an imatrix is the problem)."""
    upper = name.strip().upper()
    if upper in QUANT_TYPES:
        return upper
    if upper in NEEDS_IMATRIX:
        raise ValueError(f"{upper} needs an importance matrix (imatrix), which this sidecar does not compute yet; "
                         f"use one of {', '.join(QUANT_TYPES)} (Q4_K_M is a good default)")
    raise ValueError(f"unknown quantization type {name!r}; valid types: {', '.join(QUANT_TYPES)}")


class _Log:
    """Collects llama.cpp's log text while one quantization runs (called from the C thread)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.lines: list[str] = []
        self.step = 0
        self.total = 0
        self.tensor = ""

    def feed(self, level: int, text: bytes, user_data: Any) -> None:
        self.buffer += text.decode("utf-8", "replace")
        *complete, self.buffer = self.buffer.split("\n")
        self.lines.extend(complete)
        match = _TENSOR_LINE.match(self.buffer) or (_TENSOR_LINE.match(complete[-1]) if complete else None)
        if match:  # "[ i/ n] name ..." starts tensor i: i-1 are done
            self.step, self.total, self.tensor = int(match.group(1)) - 1, int(match.group(2)), match.group(3)

    def planned(self) -> list[tuple[str, str]]:
        """A dry run's plan: (tensor name, ggml type it will be written in), in the order of the output."""
        plan = []
        for line in self.lines:
            if (match := _TENSOR_LINE.match(line)) and (kept := _TYPE_FIELD.search(line)):
                new = _PLANNED.search(line)
                plan.append((match.group(3), new.group(1) if new else kept.group(1)))
        return plan

    def error(self) -> str | None:
        for line in reversed(self.lines + [self.buffer]):
            if _FAILED in line:
                return line.split(_FAILED, 1)[1].strip()
        return None

    def tensor_types(self) -> dict[str, int]:
        """How many tensors went out in each ggml type, from the per-tensor lines (as the loader's summary counts them)."""
        stored: list[str] = []  # per tensor; a fallback warning may split its line before "converting to"
        for line in self.lines + [self.buffer]:
            if _TENSOR_LINE.match(line) and (match := _TYPE_FIELD.search(line)):
                stored.append(match.group(1))
            if stored and (match := _CONVERTING.search(line)):
                stored[-1] = match.group(1)
        counts: dict[str, int] = {}
        for name in stored:
            counts[name.upper()] = counts.get(name.upper(), 0) + 1
        return dict(sorted(counts.items()))

    def fallbacks(self) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            match = _FALLBACK_LINE.match(line)
            if match:
                found.append({"tensor": match.group(1), "ncols": int(match.group(2)), "block": int(match.group(3)),
                              "wanted": match.group(4), "used": match.group(5)})
        return found


class _LogRouter:
    """llama.cpp has one log callback for the process; this one hands each thread's lines to its own
    _Log, so a dry run can plan while the real quantization runs."""

    def __init__(self) -> None:
        self.logs: dict[int, _Log] = {}

    def register(self, log: _Log) -> _Log:
        self.logs[threading.get_ident()] = log
        return log

    def feed(self, level: int, text: bytes, user_data: Any) -> None:
        log = self.logs.get(threading.get_ident())
        if log is not None:
            log.feed(level, text, user_data)


_KEEP_ALIVE: list[Any] = []  # log callbacks of C calls given up on (cancelled, or a stalled digest's dry run)


def quantize_gguf(src: Path, dst: Path, qtype: str, *, threads: int = 0, progress: ProgressFn | None = None,
                  cancelled: threading.Event | None = None, poll_s: float = 0.1,
                  alongside: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Quantize the GGUF at src into dst (exactly dst is written, removed again on failure or cancel).

    threads <= 0 lets llama.cpp use every hardware thread. Raises QuantizeCancelled when
    `cancelled` is set (at most poll_s later), QuantizeError with llama.cpp's message when it
    refuses (a requantization, an unsupported architecture), OSError(ENOSPC) when the disk filled.
    `alongside` runs in a nice-19 thread while llama.cpp quantizes (its result is
    "alongside" in the returned dict): llama.cpp's reads, writes and thread joins leave a third of
    two cores idle. The result's "sha256" is dst's digest, made while llama.cpp wrote it
    (runtimes/gguf/digest.py), or None when it could not be.
    """
    import llama_cpp

    qtype = canonical_type(qtype)
    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = int(threads)
    router = _LogRouter()
    log = _Log()
    callback = llama_cpp.llama_log_callback(router.feed)
    outcome: dict[str, Any] = {}

    def work() -> None:
        router.register(log)
        outcome["rc"] = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))

    def plan() -> bytes | None:
        """llama.cpp's own dry run of the same quantization names each tensor's type: the header follows."""
        dry = llama_cpp.llama_model_quantize_default_params()
        dry.ftype, dry.nthread, dry.dry_run = params.ftype, params.nthread, True
        planned = router.register(_Log())
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(dry)) != 0:
            return None
        return predict_header(src, planned.planned(), params.ftype)

    started = time.perf_counter()
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    digest = FollowingDigest(dst)
    digest.start(plan)  # first: it refuses a dst that exists, which it must see before llama.cpp creates it
    worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
    worker.start()
    side_result = _in_background(alongside) if alongside is not None else None
    reported = -1
    try:
        while worker.is_alive():
            worker.join(poll_s)
            if cancelled is not None and cancelled.is_set() and worker.is_alive():
                raise QuantizeCancelled()
            if progress is not None and log.total and log.step != reported:
                reported = log.step
                progress(log.step, log.total, f"quantizing {log.tensor}")
        seconds = time.perf_counter() - started
        outcome["alongside"] = side_result() if side_result is not None else None
    except BaseException:
        digest.abandon()
        dst.unlink(missing_ok=True)
        _hand_back_log(llama_cpp, callback, worker.is_alive() or digest.running)
        raise
    if outcome.get("rc") != 0:
        digest.abandon()
        _hand_back_log(llama_cpp, callback, digest.running)
        try:
            _raise_failure(log.error() or "llama.cpp gave no reason", src, dst)
        finally:
            dst.unlink(missing_ok=True)
    sha256 = digest.finish()
    _hand_back_log(llama_cpp, callback, digest.running)  # after the digest: its dry run logs through the router too
    if progress is not None:
        progress(log.total, log.total, f"quantized {log.total} tensors to {qtype}")
    fallbacks = log.fallbacks()
    return {"type": qtype, "ftype": QUANT_TYPES[qtype], "seconds": round(seconds, 3), "tensors": log.total,
            "bytes": dst.stat().st_size, "source_bytes": src.stat().st_size, "fallbacks": fallbacks,
            "tensor_types": log.tensor_types(), "alongside": outcome.get("alongside"), "sha256": sha256}


ALONGSIDE_GRACE_S = 0.25  # after the quantization, how long a background `alongside` is waited for


def _in_background(function: Callable[[], Any]) -> Callable[[], Any]:
    """Start function (which must be safe to run twice) in a nice-19 thread, which runs in the idle time
    llama.cpp leaves; the call returned gives its result or raises its error. If it has not finished
    ALONGSIDE_GRACE_S after that call (starved on a busy machine: a nice value cannot be raised again),
    the caller runs it itself."""
    box: dict[str, Any] = {}

    def run() -> None:
        lowest_priority()
        try:
            box["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="quantize-alongside", daemon=True)
    thread.start()

    def result() -> Any:
        thread.join(ALONGSIDE_GRACE_S)
        if thread.is_alive():
            return function()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return result


def _hand_back_log(llama_cpp: Any, callback: Any, still_called: bool) -> None:
    """llama-cpp-python's own log callback again. Ours is kept for good while a C call we gave up on may
    still call it (it may have read the old pointer just before the swap)."""
    if still_called:
        _KEEP_ALIVE.append(callback)
    _restore_default_log(llama_cpp)


def _restore_default_log(llama_cpp: Any) -> None:
    """Hand llama.cpp's log back to llama-cpp-python's own callback (quiet unless verbose)."""
    from llama_cpp import _logger

    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _raise_failure(message: str, src: Path, dst: Path) -> None:
    import errno

    if "iostream" in message or "write" in message.lower():
        # llama.cpp's ofstream says only "iostream error"; with its partial output still on disk, a
        # disk with less room left than a block of tensors is what stopped it
        if shutil.disk_usage(dst.parent).free < min(src.stat().st_size, 16 << 20):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {dst.name} (llama.cpp: {message})",
                          str(dst))
    if "requires an imatrix" in message:
        raise QuantizeError(f"llama.cpp: {message}; use a type that needs no importance matrix", reason=message)
    if "requantizing" in message:
        raise QuantizeError(f"{src.name} is already quantized (llama.cpp: {message}); quantize its f16/f32 GGUF "
                            "or the Hugging Face model instead", reason=message)
    if "unknown model architecture" in message or "failed to load model" in message.lower():
        raise UnsupportedModel(f"llama.cpp cannot read {src.name}: {message}", reason=message)
    raise QuantizeError(f"llama.cpp failed to quantize {src.name}: {message}", reason=message)


@dataclass(frozen=True)
class GgufInfo:
    """What llama.cpp itself reads from a GGUF's header: the chat side of its vocabulary and its tensor types."""

    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    control_tokens: list[str]
    eog_tokens: list[str]  # the tokens llama.cpp ends generation on
    tensor_types: dict[str, int]  # e.g. {'F32': 5, 'Q4_K': 12, 'Q6_K': 2}


_TYPE_LINE = re.compile(r"- type\s+(\S+):\s+(\d+) tensors")


def inspect_gguf(path: Path, *, tensor_types: bool = True) -> GgufInfo:
    """A vocabulary-only load through llama.cpp (no weights; well under a second where gguf-py's
    reader takes seconds on a 49k-token vocabulary). Tensor types come from its loader's summary;
    without them llama.cpp's log is left as it is (a quantization running alongside logs through it)."""
    import llama_cpp

    log = _Log()
    callback = llama_cpp.llama_log_callback(log.feed)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    if tensor_types:
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    finally:
        if tensor_types:
            _restore_default_log(llama_cpp)
    if not model:
        raise UnsupportedModel(f"llama.cpp cannot read {path}", path=str(path))
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)

        def text(token: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace") if token >= 0 else ""

        attr, control_bit = llama_cpp.llama_vocab_get_attr, llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        control = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if attr(vocab, t) & control_bit]
        # llama.cpp's end-of-generation set (llama-vocab.cpp) holds control tokens and these ids only, so only
        # they are asked about: one C call per token in all instead of two
        candidates = set(control) | {_eom_token(llama_cpp, model), *(getter(vocab) for getter in (
            llama_cpp.llama_vocab_eos, llama_cpp.llama_vocab_eot, llama_cpp.llama_vocab_fim_pad,
            llama_cpp.llama_vocab_fim_rep, llama_cpp.llama_vocab_fim_sep))}
        eog = sorted(t for t in candidates if t >= 0 and llama_cpp.llama_vocab_is_eog(vocab, t))
        template = llama_cpp.llama_model_chat_template(model, None)
        info = GgufInfo(template.decode("utf-8") if template else None, text(llama_cpp.llama_vocab_bos(vocab)),
                        text(llama_cpp.llama_vocab_eos(vocab)), bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                        [text(t) for t in control], [text(t) for t in eog], _tensor_types(log.lines + [log.buffer]))
    finally:
        llama_cpp.llama_model_free(model)
    return info


def _eom_token(llama_cpp: Any, model: Any) -> int:
    """The end-of-message id from the metadata (llama.h has no getter for it), or -1."""
    value = ctypes.create_string_buffer(32)
    if llama_cpp.llama_model_meta_val_str(model, b"tokenizer.ggml.eom_token_id", value, len(value)) < 0:
        return -1
    try:
        return int(value.value)
    except ValueError:
        return -1


def _tensor_types(lines: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in lines:
        match = _TYPE_LINE.search(line)
        if match:
            counts[match.group(1).upper()] = counts.get(match.group(1).upper(), 0) + int(match.group(2))
    return dict(sorted(counts.items()))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds, as llama.cpp counts them."""
    return inspect_gguf(path).tensor_types
