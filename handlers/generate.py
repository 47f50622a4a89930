"""generate: streamed text from a pooled model, on transformers or llama.cpp.

Requests on one model are serialized (its pool entry's lock); different models run side by side.
The decoding loop runs on a thread; tokens reach the host as `$/token` events with whole code points
only, stop strings are matched across token boundaries and never emitted, and `$/cancel` stops the
loop within one decoding step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from handlers.blocking import run_to_completion
from handlers.context import Context
from handlers.models import acquire_model, resolve
from protocol import messages as m
from protocol.errors import Cancelled, RpcError
from runtimes import cpu_share
from runtimes.text import Sampling, StopMatcher


class PromptTooLong(Exception):
    error_kind = "prompt_too_long"

    def __init__(self, prompt_tokens: int, context_length: int, runtime: str) -> None:
        larger = "load the model with a larger options.n_ctx, " if runtime == "llama.cpp" else ""
        super().__init__(f"the prompt has {prompt_tokens} tokens and the model's context holds {context_length}; "
                         f"shorten it, {larger}or pass truncate: true")
        self.error_detail = {"prompt_tokens": prompt_tokens, "context_length": context_length}


def validate(params: m.GenerateParams) -> None:
    if (params.prompt is None) == (params.messages is None):
        raise RpcError.invalid_params("params.prompt", "send exactly one of `prompt` and `messages`")
    if params.messages is not None and not params.messages:
        raise RpcError.invalid_params("params.messages", "must hold at least one message")
    checks = [
        ("max_tokens", params.max_tokens >= 1, "must be at least 1"),
        ("temperature", params.temperature >= 0, "must be >= 0 (0 is greedy)"),
        ("top_p", 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("top_k", params.top_k >= 0, "must be >= 0 (0 disables it)"),
        ("min_p", 0 <= params.min_p < 1, "must be in [0, 1)"),
        ("repeat_penalty", params.repeat_penalty > 0, "must be > 0 (1 disables it)"),
        ("stream_interval_ms", params.stream_interval_ms >= 0, "must be >= 0"),
    ]
    for name, ok, reason in checks:
        if not ok:
            raise RpcError.invalid_params(f"params.{name}", reason)


@dataclass
class Outcome:
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_eval_s: float = 0.0
    eval_s: float = 0.0
    first_token_at: float | None = None
    pieces: list[str] = field(default_factory=list)


class TokenSink:
    """Sends text to the host, coalesced to one event per `interval_s` when asked."""

    def __init__(self, ctx: Context, stream: bool, interval_s: float) -> None:
        self._ctx, self._stream, self._interval = ctx, stream, interval_s
        self._buffer = ""
        self._last = 0.0

    def send(self, text: str) -> None:
        if not (self._stream and text):
            return
        if self._interval <= 0:
            self._ctx.token(text)
            return
        self._buffer += text
        now = time.monotonic()
        if now - self._last >= self._interval:
            self.flush()
            self._last = now

    def flush(self) -> None:
        if self._buffer:
            self._ctx.token(self._buffer)
            self._buffer = ""


def prompt_ids(model: Any, params: m.GenerateParams, ctx: Context) -> tuple[list[int], int]:
    """The prompt's token ids (truncated from the left when asked) and the tokens left for the answer."""
    if params.messages is not None:
        messages = [msgspec.structs.asdict(message) for message in params.messages]
        ids = model.encode(model.render_chat(messages, params.chat_template, params.add_generation_prompt), chat=True)
    else:
        ids = model.encode(params.prompt)
    limit = model.context_length
    if len(ids) + 1 > limit or (params.truncate and len(ids) + params.max_tokens > limit):
        if not params.truncate:
            raise PromptTooLong(len(ids), limit, model.runtime)
        keep = max(1, limit - params.max_tokens)
        ctx.log("warning", f"prompt truncated from {len(ids)} to its last {keep} tokens to fit the context of {limit}",
                {"prompt_tokens": len(ids), "kept": keep})
        ids = ids[-keep:]
    return ids, min(params.max_tokens, limit - len(ids))


def decode(model: Any, params: m.GenerateParams, ctx: Context, sampling: Sampling, adapters: list) -> Outcome:
    """The decoding loop, on a worker thread."""
    ids, budget = prompt_ids(model, params, ctx)
    outcome = Outcome(prompt_tokens=len(ids))
    stop_ids = set() if params.ignore_eos else model.stop_ids()
    detokenizer, stops = model.detokenizer(), StopMatcher(params.stop)
    sink = TokenSink(ctx, params.stream, params.stream_interval_ms / 1000)

    def emit(text: str) -> None:
        if text:
            outcome.pieces.append(text)
            sink.send(text)

    started = time.perf_counter()
    with cpu_share.job(getattr(model, "fixed_threads", None)) as share:
        share.apply_to(model)  # before the prompt's prefill; then between tokens, as other programs come and go
        tokens = model.stream(ids, sampling, budget, adapters, ctx.cancelled)
        try:
            for token in tokens:
                share.apply_to(model)
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.perf_counter()
                if ctx.cancelled.is_set():
                    outcome.finish_reason = "cancelled"
                    break
                if token in stop_ids:
                    outcome.finish_reason = "stop"
                    break
                outcome.completion_tokens += 1
                emit(stops.feed(detokenizer.feed(token)))
                if stops.stopped:
                    outcome.finish_reason = "stop"
                    break
        finally:
            tokens.close()
    if not stops.stopped:
        emit(stops.feed(detokenizer.flush()))
        if not stops.stopped:
            emit(stops.flush())
    sink.flush()
    ended = time.perf_counter()
    first = outcome.first_token_at or ended
    outcome.prompt_eval_s, outcome.eval_s = first - started, ended - first
    outcome.text = "".join(outcome.pieces)
    return outcome


async def resolve_adapters(ctx: Context, params: m.GenerateParams) -> list[tuple[Path, float]]:
    adapters = []
    for index, ref in enumerate(params.adapters):
        try:
            resolved = await resolve(ctx, ref.adapter)
        except Exception as exc:  # noqa: BLE001 - name the field, keep the kind
            exc.args = (f"adapters[{index}]: {exc}",)
            raise
        adapters.append((resolved.path, ref.weight))
    return adapters


async def generate(params: m.GenerateParams, ctx: Context) -> m.GenerateResult:
    started = time.perf_counter()
    validate(params)
    adapters = await resolve_adapters(ctx, params)
    lease = await acquire_model(ctx, params.model, params.runtime, params.options, params.keep_alive)
    load_ms = (time.perf_counter() - started) * 1000
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
    sampling = Sampling(params.temperature, params.top_p, params.top_k, params.min_p, params.repeat_penalty,
                        params.repeat_last_n, seed, params.ignore_eos)
    model = lease.model
    try:
        if not getattr(model, "is_causal_lm", True):
            raise RpcError.failed("unsupported_model", f"{params.model} is not a causal language model; use embed with it")
        async with lease.entry.lock:
            ctx.check_cancelled({"text": "", "completion_tokens": 0})
            outcome = await run_to_completion(ctx, lease.entry.engine, decode, model, params, ctx, sampling, adapters)
            if ctx.cancelled.is_set():
                outcome.finish_reason = "cancelled"
    finally:
        lease.release()
    usage = m.Usage(outcome.prompt_tokens, outcome.completion_tokens)
    if outcome.finish_reason == "cancelled":
        raise Cancelled({"text": outcome.text, "usage": msgspec.to_builtins(usage)})
    decode_tokens = max(outcome.completion_tokens - 1, 0)
    timings = m.Timings(
        load_ms=round(load_ms, 3), prompt_eval_ms=round(outcome.prompt_eval_s * 1000, 3), eval_ms=round(outcome.eval_s * 1000, 3),
        ttft_ms=round(((outcome.first_token_at or time.perf_counter()) - started) * 1000, 3),
        tokens_per_s=round(decode_tokens / outcome.eval_s, 3) if outcome.eval_s > 0 and decode_tokens else 0.0,
    )
    return m.GenerateResult(params.model, model.runtime, outcome.text, outcome.finish_reason, usage, timings,  # type: ignore[arg-type]
                            seed)
