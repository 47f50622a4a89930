"""The benchmark's pieces without a sidecar: statistics against scipy, perplexity against the definition and
against Hugging Face's labels loss, llama-bench's measuring procedure, parity, the change between runs, the
table."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from runtimes.bench import machine, parity, perplexity, report, speed, stats


# ----- statistics

def test_mean_std_and_percentiles_match_numpy() -> None:
    rng = random.Random(3)
    values = [rng.gauss(50, 5) for _ in range(37)]
    assert stats.mean(values) == pytest.approx(np.mean(values))
    assert stats.std(values) == pytest.approx(np.std(values, ddof=1))
    for q in (0, 50, 90, 99, 100):
        assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert stats.std([4.0]) == 0.0 and stats.percentile([], 50) is None


def test_welch_t_test_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(7)
    for _ in range(40):
        a = [rng.gauss(100, rng.uniform(0.1, 5)) for _ in range(rng.randint(2, 12))]
        b = [rng.gauss(100 + rng.uniform(-6, 6), rng.uniform(0.1, 5)) for _ in range(rng.randint(2, 12))]
        t, df, p = stats.welch(a, b)
        expected = scipy_stats.ttest_ind(a, b, equal_var=False)
        assert t == pytest.approx(expected.statistic, rel=1e-9)
        assert p == pytest.approx(expected.pvalue, rel=1e-7, abs=1e-12)
    for t, df in ((0.3, 1.0), (2.0, 2.5), (12.0, 30.0), (-1.7, 7.3)):
        assert stats.t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-9)


def test_welch_edge_cases() -> None:
    assert stats.welch([1.0], [1.0, 2.0]) is None
    assert stats.welch([3.0, 3.0], [3.0, 3.0])[2] == 1.0
    assert stats.welch([3.0, 3.0], [4.0, 4.0])[2] == 0.0
    assert stats.t_two_sided_p(0.0, 5.0) == pytest.approx(1.0)


# ----- perplexity

class BigramEngine:
    """Logits depend on the previous token only, so every window's score of a token is the same."""

    add_bos, bos, n_vocab = False, 0, 11

    def __init__(self) -> None:
        self.table = np.random.default_rng(0).normal(size=(self.n_vocab, self.n_vocab)).astype(np.float32)
        self.calls: list[tuple[int, int]] = []

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % self.n_vocab for c in text]

    def logits(self, ids: list[int], first: int) -> np.ndarray:
        self.calls.append((len(ids), first))
        return self.table[np.asarray(ids[first:])]


def _token_nll(engine: BigramEngine, ids: list[int], targets: list[int] | None = None) -> float:
    """Sum of -log p(ids[i] | ids[i-1]) over the target indices (default: all but the first)."""
    targets = list(range(1, len(ids))) if targets is None else targets
    x = engine.table[np.asarray([ids[i - 1] for i in targets])].astype(np.float64)
    log_z = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return float((log_z - x[np.arange(len(targets)), [ids[i] for i in targets]]).sum())


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (16, 1), (7, 3), (200, 50)])
def test_sliding_scores_each_token_once_and_all_but_the_first_when_windows_overlap(context: int, stride: int) -> None:
    engine = BigramEngine()
    ids = engine.tokenize("the quick brown fox jumps over the lazy dog, again and again and again")
    result = perplexity.sliding(engine, ids, context, stride, lambda *_: None)
    # With stride < context every token but the text's first has history inside its window; with stride ==
    # context a window's first token has none and is not scored (as in Hugging Face's loop).
    targets = [i for i in range(1, len(ids)) if stride < context or i % context]
    assert result["tokens"] == len(ids) and result["scored"] == len(targets)
    assert result["nll"] == pytest.approx(_token_nll(engine, ids, targets) / len(targets), abs=1e-6)
    assert all(length <= context for length, _ in engine.calls)


def test_chunks_score_the_second_half_of_each_chunk_and_put_bos_first() -> None:
    engine = BigramEngine()
    engine.add_bos, engine.bos = True, 3
    ids = list(range(11)) * 5  # 55 tokens: 3 chunks of 16, 7 dropped
    seen = []
    original = engine.logits
    engine.logits = lambda window, first: (seen.append(list(window)), original(window, first))[1]  # type: ignore[method-assign]
    result = perplexity.chunks(engine, ids, 16, lambda *_: None)
    assert result["scored"] == 3 * (16 - 1 - 8) and result["tokens"] == 55
    assert [w[0] for w in seen] == [3, 3, 3] and seen[1][1:] == ids[17:32]
    expected = sum(_token_nll(engine, ids, list(range(c * 16 + 9, (c + 1) * 16))) for c in range(3)) / result["scored"]
    assert result["nll"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(perplexity.TextTooShort):
        perplexity.chunks(engine, ids[:31], 16, lambda *_: None)


def test_sliding_on_a_transformers_model_matches_the_labels_loss() -> None:
    """Our window arithmetic against Hugging Face's own loss (labels -100 outside each window's new tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()

    class Engine:
        add_bos, bos = False, None

        def logits(self, ids: list[int], first: int) -> np.ndarray:
            with torch.no_grad():
                return model(torch.tensor([ids]), logits_to_keep=len(ids) - first).logits[0].numpy()

    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    context, stride = 40, 15
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())  # the labels the loss really averaged after its shift
        nll_sum, count, prev_end = nll_sum + float(loss) * n, count + n, end
        if end == len(ids):
            break
    ours = perplexity.sliding(Engine(), ids, context, stride, lambda *_: None)
    assert ours["scored"] == count == len(ids) - 1
    assert ours["ppl"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)


# ----- llama-bench's procedure

class RecordingEngine:
    n_vocab, add_bos, bos = 50, True, 1

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def use_context(self, n: int) -> None:
        self.log.append(("context", n))

    def close_context(self) -> None:
        self.log.append(("close",))

    def clear(self) -> None:
        self.log.append(("clear",))

    def prompt(self, ids: list[int]) -> None:
        self.log.append(("prompt", list(ids)))

    def step(self, token: int) -> None:
        self.log.append(("step", token))

    def last_argmax(self) -> int:
        return 0


def test_speed_follows_llama_bench_fresh_context_warmup_cleared_cache_bos_first() -> None:
    engine = RecordingEngine()
    ticks = []
    result = speed.measure(engine, [12], [4], repetitions=3, warmup=1, seed=5, tick=lambda *a: ticks.append(a))
    log = engine.log
    assert log[0] == ("context", 12) and log[-1] == ("close",) and ("context", 4) in log
    prompts = [e for e in log if e[0] == "prompt"]
    assert len(prompts) == 1 + 3 and all(len(p[1]) == 12 and p[1][0] == 1 for p in prompts)
    assert all(0 <= t < 50 for p in prompts for t in p[1])
    steps = [e for e in log if e[0] == "step"]
    assert len(steps) == 1 + 3 * 4 and steps[1][1] == 1  # warmup: one token; each repetition from BOS
    assert log.count(("clear",)) == (1 + 3) * 2  # before the warmup and every repetition of both tests
    assert [s["test"] for s in result["speed"]] == ["pp12", "tg4"] and all(len(s["samples_tps"]) == 3 for s in result["speed"])
    assert result["latency"]["p50_ms"] <= result["latency"]["p99_ms"] and result["latency"]["ttft_ms"] > 0
    assert ticks[:3] == [("pp12", 1, 3), ("pp12", 2, 3), ("pp12", 3, 3)]


# ----- parity

class TableEngine(BigramEngine):
    def tokenize_prompt(self, text: str) -> list[int]:
        return self.tokenize(text)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out, last = [], ids[-1]
        for _ in range(n):
            last = int(np.argmax(self.table[last]))
            out.append(last)
        return out


def test_parity_is_perfect_against_itself_and_finds_the_first_divergence() -> None:
    engine = TableEngine()
    golden = parity.transcripts(engine, ["abc", "xyz"], 6, lambda *_: None)
    same = parity.compare(engine, ["abc", "xyz"], golden, "ref", lambda *_: None)
    assert same["identical"] == 2 and same["mean_top1_agreement"] == 1.0
    other = TableEngine()
    token = golden[0]["tokens"][2]
    other.table = engine.table.copy()
    previous = golden[0]["tokens"][1]
    other.table[previous, token] = -100.0  # the model now never follows `previous` with `token`
    changed = parity.compare(other, ["abc"], golden[:1], "ref", lambda *_: None)["prompts"][0]
    assert changed["first_divergence"] == 2 and changed["top1_agreement"] < 1.0 and changed["same_prompt_tokens"]


# ----- history and the table

def _row(key: str, pp: list[float], tg: list[float], status: str = "ok") -> dict[str, Any]:
    speed_rows = [{"test": "pp32", "kind": "pp", "tokens": 32, "mean_tps": stats.mean(pp), "std_tps": stats.std(pp), "samples_tps": pp},
                  {"test": "tg8", "kind": "tg", "tokens": 8, "mean_tps": stats.mean(tg), "std_tps": stats.std(tg), "samples_tps": tg}]
    return {"label": "m", "key": key, "status": status, "speed": speed_rows if status == "ok" else [], "runtime": "llama.cpp",
            "dtype": "f32", "size_bytes": 2**20, "load_s": 0.5, "peak_rss_bytes": 2**26, "latency": None, "perplexity": None,
            "parity": None, "embed": None, "machine": None, "change": None, "error": None if status == "ok" else
            {"kind": "unsupported_model", "message": "bad | file", "code": -32803}}


def test_change_is_against_the_newest_run_with_the_same_key() -> None:
    now = _row("k", [100, 101, 99, 100], [50, 50.5, 49.5, 50])
    older = ("bench-old", 1.0, _row("k", [80, 81, 79, 80], [50, 50.2, 49.8, 50.1]))
    newer_other_key = ("bench-x", 3.0, _row("other", [1, 2, 3], [1, 2, 3]))
    newer_failed = ("bench-f", 2.0, _row("k", [], [], status="failed"))
    change = report.change(now, [newer_other_key, newer_failed, older])
    assert change["previous_run"] == "bench-old" and change["pp_pct"] == pytest.approx(25.0)
    pp, tg = change["tests"]
    assert pp["significant"] and not tg["significant"] and change["significant"]
    assert pp["p_value"] == pytest.approx(stats.welch([100, 101, 99, 100], [80, 81, 79, 80])[2], abs=1e-6)
    assert report.change(now, [newer_other_key]) is None


def test_markdown_has_the_same_columns_for_every_row_failed_ones_too() -> None:
    rows = [_row("a", [10, 11], [5, 6]), _row("b", [], [], status="failed")]
    settings = {"threads": 2, "omp_wait_policy": "PASSIVE", "batch_size": 2048, "ubatch_size": 512, "repetitions": 2, "warmup": 1}
    lines = [line for line in report.markdown(rows, settings).splitlines() if line.startswith("|")]
    assert len(lines) == 4 and len({line.count("|") for line in lines}) == 1
    assert "10.50 ± 0.71" in lines[2] and "FAILED" in lines[3] and "bad / file" in lines[3]


def test_machine_describes_other_processes_cpu_use() -> None:
    before = machine.snapshot()
    sum(i * i for i in range(200_000))
    described = machine.describe(before, machine.snapshot())
    assert described["cpus"] >= 1 and isinstance(described["busy"], bool)
    assert described["foreign_cpus"] is None or described["foreign_cpus"] >= 0
    assert (described["note"] is not None) == described["busy"]
