"""Prompt processing (pp N) and generation (tg N) speed, measured as llama-bench measures them.

Following tools/llama-bench/llama-bench.cpp (test_prompt, test_gen and its main loop), for each test:
a fresh context of N cells; `warmup` untimed runs (pp: the whole prompt; tg: one token); then per
repetition the cache is cleared and the test timed: pp feeds N random tokens (the first one BOS when
the vocabulary adds it) in batches of n_batch, logits for the last token only, and waits for the
result; tg decodes N random tokens one at a time from an empty context, waiting for each. Tokens/s
per repetition is N / time; the row reports their mean and sample standard deviation, as llama-bench
does. The random tokens are drawn before the clock starts (llama-bench draws them inside its timed
loop; rand() is far below a decode step either way).

Beyond llama-bench: each tg step is timed on its own (per-token latency percentiles), and each pp
repetition also reads the last token's logits and picks the top token, which gives the time to
first token for a prompt of that length.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from runtimes.bench import stats

Tick = Callable[[str, int, int], None]  # (test, repetition done, repetitions); may raise to stop


def _random_ids(engine: Any, rng: random.Random, n: int, first_may_be_bos: bool) -> list[int]:
    ids = [rng.randrange(engine.n_vocab) for _ in range(n)]
    if first_may_be_bos and engine.add_bos and ids:
        ids[0] = engine.bos
    return ids


def run_prompt_test(engine: Any, n: int, repetitions: int, warmup: int, rng: random.Random, tick: Tick) -> dict[str, Any]:
    engine.use_context(n)
    for _ in range(warmup):
        engine.clear()
        engine.prompt(_random_ids(engine, rng, n, True))
    samples, ttft = [], []
    for rep in range(repetitions):
        ids = _random_ids(engine, rng, n, True)
        engine.clear()
        started = time.perf_counter()
        engine.prompt(ids)
        done = time.perf_counter()
        engine.last_argmax()
        ttft.append(time.perf_counter() - started)
        samples.append(n / (done - started))
        tick(f"pp{n}", rep + 1, repetitions)
    engine.close_context()
    return {"speed": _speed(f"pp{n}", "pp", n, samples), "ttft_s": ttft}


def run_gen_test(engine: Any, n: int, repetitions: int, warmup: int, rng: random.Random, tick: Tick) -> dict[str, Any]:
    engine.use_context(n)
    for _ in range(warmup):
        engine.clear()
        engine.step(_random_ids(engine, rng, 1, True)[0])
    samples, latencies = [], []
    for rep in range(repetitions):
        ids = _random_ids(engine, rng, n, True)
        engine.clear()
        started = time.perf_counter()
        previous = started
        for token in ids:
            engine.step(token)
            now = time.perf_counter()
            latencies.append(now - previous)
            previous = now
        samples.append(n / (previous - started))
        tick(f"tg{n}", rep + 1, repetitions)
    engine.close_context()
    return {"speed": _speed(f"tg{n}", "tg", n, samples), "latencies_s": latencies}


def _speed(test: str, kind: str, tokens: int, samples: list[float]) -> dict[str, Any]:
    return {"test": test, "kind": kind, "tokens": tokens, "mean_tps": round(stats.mean(samples), 3),
            "std_tps": round(stats.std(samples), 3), "samples_tps": [round(s, 3) for s in samples]}


def measure(engine: Any, prompt_tokens: list[int], gen_tokens: list[int], repetitions: int, warmup: int, seed: int,
            tick: Tick) -> dict[str, Any]:
    """Every pp test, then every tg test (llama-bench's order); the latency of the first pp and all tg steps."""
    rng = random.Random(seed)
    speed, ttft, latencies = [], None, []
    for n in prompt_tokens:
        result = run_prompt_test(engine, n, repetitions, warmup, rng, tick)
        speed.append(result["speed"])
        ttft = ttft if ttft is not None else result["ttft_s"]
    for n in gen_tokens:
        result = run_gen_test(engine, n, repetitions, warmup, rng, tick)
        speed.append(result["speed"])
        latencies += result["latencies_s"]
    ms = [x * 1000 for x in latencies]
    latency = {"ttft_ms": round(stats.mean(ttft) * 1000, 3) if ttft else None,
               **{f"p{q}_ms": (round(v, 3) if (v := stats.percentile(ms, q)) is not None else None) for q in (50, 90, 99)}}
    return {"speed": speed, "latency": latency}
