"""Unit tests of the training internals: batch planning and collation, the chunked loss, packed
attention, the learning-rate schedule and loss of the trainer, checkpoints and the metric reports."""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtimes.train.chunked_loss import linear_cross_entropy_sum
from runtimes.train.batches import PlanOptions, collate, count_targets, plan_epoch
from runtimes.train.checkpoint import CheckpointInvalid, load_checkpoint, read_state, save_checkpoint
from runtimes.train.report import COLUMNS, plot_loss, write_metrics
from runtimes.train.trainer import TrainConfig, causal_lm_loss_sum, lr_at


@dataclass
class Ex:
    input_ids: list[int]
    loss_mask: list[bool]


def skewed_lengths(count: int = 120, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(2, 8), rng.randint(20, 40), rng.randint(90, 128)]) for _ in range(count)]


def random_examples(count: int, seed: int, vocab: int = 100) -> list[Ex]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(1, 9)
        out.append(Ex([rng.randrange(1, vocab) for _ in range(n)], [rng.random() < 0.6 for _ in range(n)]))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one intra-op thread is fastest, and avoids spinning on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flat(plan: list[list[list[int]]]) -> list[int]:
    return [i for shards in plan for shard in shards for i in shard]


# ---------------------------------------------------------------- plan_epoch

PLAN_CASES = [
    PlanOptions(batch_size=4, batch_tokens=None, packing=True),
    PlanOptions(batch_size=4, batch_tokens=None, packing=False),
    PlanOptions(batch_size=4, batch_tokens=256, packing=True),
    PlanOptions(batch_size=3, batch_tokens=None, packing=True, world_size=2),
    PlanOptions(batch_size=3, batch_tokens=None, packing=False, world_size=2),
    PlanOptions(batch_size=3, batch_tokens=200, packing=True, world_size=2),
]


@pytest.mark.parametrize("options", PLAN_CASES)
def test_plan_is_deterministic_differs_by_epoch_and_covers_each_example_once(options: PlanOptions) -> None:
    lengths = skewed_lengths()
    first = plan_epoch(lengths, 7, 0, options)
    assert plan_epoch(lengths, 7, 0, options) == first
    assert plan_epoch(list(lengths), 7, 0, options) == first
    second = plan_epoch(lengths, 7, 1, options)
    assert second != first
    assert flat(second) != flat(first)
    assert plan_epoch(lengths, 8, 0, options) != first
    for plan in (first, second):
        order = flat(plan)
        assert sorted(order) == list(range(len(lengths)))  # every example exactly once
        for shards in plan:
            assert len(shards) == options.world_size
            assert any(shards)


@pytest.mark.parametrize("options", [o for o in PLAN_CASES if o.world_size == 2 and not o.batch_tokens])
def test_world_size_two_shards_partition_and_are_token_balanced(options: PlanOptions) -> None:
    lengths = skewed_lengths(seed=3)
    plan = plan_epoch(lengths, 1, 0, options)
    single = PlanOptions(options.batch_size * 2, options.batch_tokens and options.batch_tokens * 2, options.packing, 1)
    groups = [shards[0] for shards in plan_epoch(lengths, 1, 0, single)]
    assert len(groups) == len(plan)
    for shards, group in zip(plan, groups):
        # the shards of each global micro-batch partition exactly that micro-batch
        assert sorted(shards[0] + shards[1]) == sorted(group)
        assert not set(shards[0]) & set(shards[1])
        loads = [sum(lengths[i] for i in shard) for shard in shards]
        if len(group) >= 2:
            # greedy balancing: the loads differ by at most the longest example in the group
            assert abs(loads[0] - loads[1]) <= max(lengths[i] for i in group)
    total_gap = sum(abs(sum(lengths[i] for i in s[0]) - sum(lengths[i] for i in s[1])) for s in plan)
    naive_gap = sum(abs(sum(lengths[i] for i in g[: len(g) // 2]) - sum(lengths[i] for i in g[len(g) // 2:])) for g in groups)
    assert total_gap < naive_gap


def test_world_size_two_shard_balance_is_exact_on_a_small_group() -> None:
    lengths = [10, 9, 8, 7, 1, 1]
    plan = plan_epoch(lengths, 0, 0, PlanOptions(batch_size=3, batch_tokens=None, packing=True, world_size=2))
    assert len(plan) == 1
    loads = sorted(sum(lengths[i] for i in shard) for shard in plan[0])
    assert loads == [18, 18]


@pytest.mark.parametrize("budget", [64, 128, 300])
def test_batch_tokens_budget_is_respected(budget: int) -> None:
    lengths = skewed_lengths(seed=5) + [budget + 17]  # one example over budget: must sit alone
    plan = plan_epoch(lengths, 2, 0, PlanOptions(batch_size=8, batch_tokens=budget, packing=True))
    for (shard,) in plan:
        tokens = sum(lengths[i] for i in shard)
        assert tokens <= budget or len(shard) == 1
    assert [len(lengths) - 1] in [shards[0] for shards in plan]
    assert sorted(flat(plan)) == list(range(len(lengths)))


def test_batch_tokens_global_budget_with_two_processes() -> None:
    lengths = skewed_lengths(seed=6)
    budget = 150
    plan = plan_epoch(lengths, 2, 0, PlanOptions(batch_size=8, batch_tokens=budget, packing=True, world_size=2))
    for shards in plan:
        group = shards[0] + shards[1]
        assert sum(lengths[i] for i in group) <= 2 * budget or len(group) == 1


def test_batch_tokens_budget_per_process_with_two_processes() -> None:
    """batch_tokens is each process's budget (the global one is batch_tokens * world_size), so no
    process's micro-batch may exceed it unless it holds a single example."""
    lengths = [6] * 6
    plan = plan_epoch(lengths, 0, 0, PlanOptions(batch_size=8, batch_tokens=10, packing=True, world_size=2))
    for shards in plan:
        for shard in shards:
            assert sum(lengths[i] for i in shard) <= 10 or len(shard) == 1, (plan, shard)


def _padding(groups: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups if g)


def test_unpacked_batches_are_grouped_by_length() -> None:
    lengths = skewed_lengths(count=200, seed=9)
    grouped = plan_epoch(lengths, 4, 0, PlanOptions(batch_size=4, batch_tokens=None, packing=False))
    plain = plan_epoch(lengths, 4, 0, PlanOptions(batch_size=4, batch_tokens=None, packing=True))
    grouped_groups = [shards[0] for shards in grouped]
    plain_groups = [shards[0] for shards in plain]
    assert all(len(g) == 4 for g in grouped_groups)
    assert _padding(grouped_groups, lengths) < _padding(plain_groups, lengths) / 3


# ---------------------------------------------------------------- collate and count_targets

EXAMPLES = [
    Ex([1, 2, 3, 4], [False, False, True, True]),
    Ex([5, 6, 7], [True, True, True]),  # the first token is masked in but has nothing before it
    Ex([8], [True]),
    Ex([9, 10], [False, False]),
]


def test_collate_packed_layout() -> None:
    batch = collate(EXAMPLES, [0, 1, 2, 3], packing=True, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 0, 1]]
    assert batch.segments == [(0, 4), (4, 7), (7, 8), (8, 10)]
    assert batch.attention_mask is None
    assert batch.predict_at.tolist() == [1, 2, 4, 5]
    assert batch.targets.tolist() == [3, 4, 6, 7]
    assert batch.tokens == batch.padded_tokens == 10
    assert count_targets(EXAMPLES, [0, 1, 2, 3]) == 4


def test_collate_packed_in_another_order() -> None:
    batch = collate(EXAMPLES, [2, 1, 0], packing=True, pad_id=0)
    assert batch.input_ids.tolist() == [[8, 5, 6, 7, 1, 2, 3, 4]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 0, 1, 2, 3]]
    assert batch.segments == [(0, 1), (1, 4), (4, 8)]
    assert batch.predict_at.tolist() == [1, 2, 5, 6]
    assert batch.targets.tolist() == [6, 7, 3, 4]


def _expected_targets(examples: list[Ex], indices: list[int]) -> set[tuple[int, int]]:
    """(index into the example list, position in the example) of every token with a loss."""
    return {(i, j) for i in indices for j in range(1, len(examples[i].input_ids)) if examples[i].loss_mask[j]}


@pytest.mark.parametrize("seed", range(5))
def test_collate_packed_targets_are_exactly_the_masked_in_tokens(seed: int) -> None:
    examples = random_examples(12, seed)
    indices = random.Random(seed).sample(range(12), 8)
    batch = collate(examples, indices, packing=True, pad_id=0)
    ids = batch.input_ids[0].tolist()
    positions = batch.position_ids[0].tolist()
    assert len(batch.segments) == len(indices)
    owner = {}
    for (start, end), i in zip(batch.segments, indices):
        assert ids[start:end] == examples[i].input_ids
        assert positions[start:end] == list(range(end - start))
        for p in range(start, end):
            owner[p] = (i, p - start)
    assert batch.segments[0][0] == 0 and batch.segments[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in zip(batch.segments, batch.segments[1:]))
    found = set()
    for p, t in zip(batch.predict_at.tolist(), batch.targets.tolist()):
        i, j = owner[p + 1]
        assert j >= 1  # predicted from the position before it, inside the same example
        assert owner[p] == (i, j - 1)
        assert examples[i].loss_mask[j]
        assert t == ids[p + 1]
        found.add((i, j))
    assert found == _expected_targets(examples, indices)
    assert len(found) == batch.targets.numel() == count_targets(examples, indices)
    assert batch.tokens == batch.padded_tokens == sum(len(examples[i].input_ids) for i in indices)


def test_collate_padded_layout() -> None:
    batch = collate(EXAMPLES, [0, 1, 2], packing=False, pad_id=99)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 99], [8, 99, 99, 99]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch.position_ids[:, :3].tolist()[0] == [0, 1, 2] and batch.position_ids[1, :3].tolist() == [0, 1, 2]
    assert batch.segments is None
    assert batch.predict_at.tolist() == [1, 2, 4, 5]
    assert batch.targets.tolist() == [3, 4, 6, 7]
    assert batch.tokens == 8
    assert batch.padded_tokens == 12


@pytest.mark.parametrize("seed", range(5))
def test_collate_padded_never_targets_padding(seed: int) -> None:
    examples = random_examples(10, seed + 100)
    indices = random.Random(seed).sample(range(10), 6)
    pad_id = examples[indices[0]].input_ids[0]  # a pad id that is also a real token
    batch = collate(examples, indices, packing=False, pad_id=pad_id)
    rows, width = batch.input_ids.shape
    assert rows == len(indices) and width == max(len(examples[i].input_ids) for i in indices)
    mask = batch.attention_mask.reshape(-1).tolist()
    ids = batch.input_ids.reshape(-1).tolist()
    found = set()
    for p, t in zip(batch.predict_at.tolist(), batch.targets.tolist()):
        row, col = divmod(p, width)
        assert col + 1 < width and mask[p] == 1 and mask[p + 1] == 1  # both positions real, same row
        assert ids[p + 1] == t
        found.add((indices[row], col + 1))
    assert found == _expected_targets(examples, indices)
    assert batch.targets.numel() == count_targets(examples, indices)
    assert batch.tokens == sum(len(examples[i].input_ids) for i in indices) == sum(mask)
    assert batch.padded_tokens == rows * width
    for row, i in enumerate(indices):
        n = len(examples[i].input_ids)
        assert batch.input_ids[row, n:].eq(pad_id).all()
        assert batch.position_ids[row, :n].tolist() == list(range(n))


def test_collate_empty_and_count_targets_of_nothing() -> None:
    batch = collate(EXAMPLES, [], packing=True, pad_id=0)
    assert batch.tokens == 0 and batch.targets.numel() == 0 and batch.predict_at.numel() == 0
    assert count_targets(EXAMPLES, []) == 0
    assert count_targets(EXAMPLES, [2, 3]) == 0


# ---------------------------------------------------------------- chunked loss


def _loss_inputs(rows: int = 7, dim: int = 5, vocab: int = 11, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets, scale: float = 1.0):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    logits = h @ w.T + (b if b is not None else 0)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, b.grad if b is not None else None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [3, 7, 16])
def test_linear_cross_entropy_matches_torch(chunk: int, bias: bool) -> None:
    hidden, weight, b, targets = _loss_inputs(bias=bias)
    loss = linear_cross_entropy_sum(hidden, weight, b, targets, chunk=chunk)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (loss * 2.5).backward()
    ref_loss, ref_h, ref_w, ref_b = _reference(hidden, weight, b, targets, scale=2.5)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(b.grad, ref_b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_with_frozen_weight() -> None:
    hidden, weight, b, targets = _loss_inputs(rows=9, bias=True, seed=1)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    loss = linear_cross_entropy_sum(hidden, weight, b, targets, chunk=4)
    loss.backward()
    ref_loss, ref_h, _, _ = _reference(hidden, weight, b, targets)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-5, atol=1e-6)
    assert weight.grad is None and b.grad is None


def test_linear_cross_entropy_with_frozen_hidden() -> None:
    hidden, weight, b, targets = _loss_inputs(rows=5, bias=True, seed=2)
    hidden.requires_grad_(False)
    loss = linear_cross_entropy_sum(hidden, weight, b, targets, chunk=2)
    loss.backward()
    _, _, ref_w, ref_b = _reference(hidden, weight, b, targets)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, ref_b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_of_nothing_is_a_zero_with_a_graph() -> None:
    hidden = torch.zeros(0, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    assert loss.dim() == 0
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 5)


# ---------------------------------------------------------------- tiny Llama: packed attention and the loss


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attention_dropout=0.0)
    model = LlamaForCausalLM(config).float()
    model.config.use_cache = False
    model.eval()
    return model


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


SEQS = [[5, 17, 3, 99, 42, 8, 1], [2, 61, 33, 4], [70, 12, 9, 9, 50, 23, 11, 64, 2]]


def _set_attn(model, name: str) -> None:
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name


def test_packed_attention_matches_each_example_alone(llama) -> None:
    from runtimes.train.packed_attention import PACKED_ATTENTION, register

    assert register() == PACKED_ATTENTION
    assert register() == PACKED_ATTENTION  # idempotent
    lengths = [len(s) for s in SEQS]
    starts = [sum(lengths[:k]) for k in range(len(SEQS))]
    segments = [(s, s + n) for s, n in zip(starts, lengths)]
    ids = torch.tensor([[t for s in SEQS for t in s]])
    positions = torch.tensor([[p for n in lengths for p in range(n)]])
    weights = torch.randn(ids.shape[1], 64, generator=torch.Generator().manual_seed(3))

    try:
        _set_attn(llama, PACKED_ATTENTION)
        llama.zero_grad(set_to_none=True)
        packed = llama.model(input_ids=ids, position_ids=positions, packed_segments=segments, use_cache=False).last_hidden_state
        (packed[0] * weights).sum().backward()
        packed_grads = {n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None}

        _set_attn(llama, "sdpa")
        llama.zero_grad(set_to_none=True)
        alone = []
        for seq, (s, e) in zip(SEQS, segments):
            out = llama.model(input_ids=torch.tensor([seq]), use_cache=False).last_hidden_state
            (out[0] * weights[s:e]).sum().backward()
            alone.append(out.detach())
        alone_grads = {n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None}
    finally:
        llama.zero_grad(set_to_none=True)
        _set_attn(llama, "sdpa")

    torch.testing.assert_close(packed.detach(), torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 10
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_attention_without_segments_is_plain_causal(llama) -> None:
    from runtimes.train.packed_attention import PACKED_ATTENTION, register

    register()
    ids = torch.tensor([SEQS[2]])
    try:
        _set_attn(llama, PACKED_ATTENTION)
        with torch.no_grad():
            packed = llama.model(input_ids=ids, use_cache=False).last_hidden_state
        _set_attn(llama, "sdpa")
        with torch.no_grad():
            stock = llama.model(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        _set_attn(llama, "sdpa")
    torch.testing.assert_close(packed, stock, rtol=1e-5, atol=1e-5)


LOSS_EXAMPLES = [
    Ex(SEQS[0], [False, False, False, True, True, True, True]),
    Ex(SEQS[1], [True, True, True, True]),
    Ex(SEQS[2], [False, True, False, True, True, False, True, True, True]),
]


def _reference_loss(model, examples: list[Ex]):
    """Sum of the stock model's shifted token cross-entropies over the masked-in tokens."""
    total = torch.zeros(())
    count = 0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
        shift_logits, shift_labels = logits[:-1], torch.tensor(ex.input_ids[1:])
        mask = torch.tensor(ex.loss_mask[1:])
        per_token = F.cross_entropy(shift_logits.float(), shift_labels, reduction="none")
        total = total + per_token[mask].sum()
        count += int(mask.sum())
    return total, count


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [True, False])
def test_causal_lm_loss_sum_matches_the_stock_model(llama, packing: bool) -> None:
    from runtimes.train.packed_attention import PACKED_ATTENTION, register

    register()
    indices = [0, 1, 2]
    batch = collate(LOSS_EXAMPLES, indices, packing=packing, pad_id=0)
    try:
        _set_attn(llama, "sdpa")
        llama.zero_grad(set_to_none=True)
        reference, count = _reference_loss(llama, LOSS_EXAMPLES)
        reference.backward()
        ref_grads = _grads(llama)
        assert count == batch.targets.numel() == count_targets(LOSS_EXAMPLES, indices)

        _set_attn(llama, PACKED_ATTENTION if packing else "sdpa")
        llama.zero_grad(set_to_none=True)
        loss = causal_lm_loss_sum(llama, batch.input_ids, batch.position_ids, batch.attention_mask, batch.segments,
                                  batch.predict_at, batch.targets)
        loss.backward()
        grads = _grads(llama)
    finally:
        llama.zero_grad(set_to_none=True)
        _set_attn(llama, "sdpa")
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_causal_lm_loss_sum_single_sequence_and_stock_logits_path(llama) -> None:
    ex = LOSS_EXAMPLES[2]
    batch = collate([ex], [0], packing=True, pad_id=0)
    _set_attn(llama, "sdpa")
    with torch.no_grad():
        reference, _ = _reference_loss(llama, [ex])
        plain = causal_lm_loss_sum(llama, batch.input_ids, batch.position_ids, None, None, batch.predict_at, batch.targets)
        llama.config.final_logit_softcapping = 30.0  # forces the full-logits path (Llama itself ignores the field)
        try:
            stock = causal_lm_loss_sum(llama, batch.input_ids, batch.position_ids, None, None, batch.predict_at, batch.targets)
        finally:
            llama.config.final_logit_softcapping = None
    torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stock, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- lr_at


def test_lr_warmup_then_cosine() -> None:
    config = TrainConfig(learning_rate=1.0, lr_schedule="cosine", warmup_steps=10)
    total = 110
    assert lr_at(0, total, config) == pytest.approx(0.1)
    assert lr_at(4, total, config) == pytest.approx(0.5)
    assert lr_at(9, total, config) == pytest.approx(1.0)  # last warmup step reaches the peak
    assert lr_at(10, total, config) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(60, total, config) == pytest.approx(0.5)  # midpoint of the decay
    assert lr_at(total - 1, total, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert 0 < lr_at(total - 1, total, config) < 1e-3
    assert lr_at(total, total, config) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, total, config) for s in range(10, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_warmup_then_linear() -> None:
    config = TrainConfig(learning_rate=2e-4, lr_schedule="linear", warmup_steps=4)
    total = 104
    assert lr_at(0, total, config) == pytest.approx(0.5e-4)
    assert lr_at(3, total, config) == pytest.approx(2e-4)
    assert lr_at(4, total, config) == pytest.approx(2e-4)
    assert lr_at(54, total, config) == pytest.approx(1e-4)
    assert lr_at(total - 1, total, config) == pytest.approx(2e-4 / 100)
    assert lr_at(total, total, config) == pytest.approx(0.0, abs=1e-15)


def test_lr_warmup_then_constant() -> None:
    config = TrainConfig(learning_rate=3e-4, lr_schedule="constant", warmup_steps=5)
    total = 50
    assert lr_at(0, total, config) == pytest.approx(3e-4 / 5)
    assert lr_at(4, total, config) == pytest.approx(3e-4)
    assert lr_at(5, total, config) == pytest.approx(3e-4)
    assert lr_at(25, total, config) == pytest.approx(3e-4)
    assert lr_at(total - 1, total, config) == pytest.approx(3e-4)


def test_lr_warmup_from_ratio_and_no_warmup() -> None:
    config = TrainConfig(learning_rate=1.0, lr_schedule="linear", warmup_steps=None, warmup_ratio=0.03)
    assert lr_at(0, 100, config) == pytest.approx(1 / 3)  # ceil(0.03 * 100) = 3 warmup steps
    assert lr_at(2, 100, config) == pytest.approx(1.0)
    assert lr_at(3, 100, config) == pytest.approx(1.0)
    none = TrainConfig(learning_rate=1.0, lr_schedule="cosine", warmup_steps=0)
    assert lr_at(0, 10, none) == pytest.approx(1.0)
    assert lr_at(5, 10, none) == pytest.approx(0.5)
    assert lr_at(9, 10, none) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


# ---------------------------------------------------------------- checkpoints


def _linear_run(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    named = dict(layer.named_parameters())
    names = {id(p): n for n, p in named.items()}
    optimizer = torch.optim.AdamW(list(named.values()), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    return layer, named, names, optimizer


def _train_steps(layer, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
        F.mse_loss(layer(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    layer, named, names, optimizer = _linear_run(0)
    _train_steps(layer, optimizer, 2, seed=1)
    # a step in progress: gradients accumulated from one micro-batch
    F.mse_loss(layer(torch.randn(5, 4)), torch.randn(5, 3)).backward()
    grads = {n: p.grad.clone() for n, p in named.items()}
    rngs = [torch.get_rng_state(), torch.Generator().manual_seed(123).get_state()]
    dest = tmp_path / "run" / "checkpoints" / "step-000002-micro-001"
    state = {"cursor": {"step": 2, "epoch": 0, "index": 3, "micro_done": 1}, "history": [{"step": 1, "loss": 1.5}]}
    saved = save_checkpoint(dest, trainable=named, optimizer=optimizer, param_names=names, grads=grads, rng_states=rngs,
                            state=state)
    assert Path(saved) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temporary left behind
    assert {p.name for p in dest.iterdir()} == {"trainable.safetensors", "optimizer.safetensors", "state.json"}

    read = read_state(dest)
    assert read["cursor"] == state["cursor"] and read["history"] == state["history"]
    assert read["has_grads"] is True and read["world_size"] == 2

    layer2, named2, names2, optimizer2 = _linear_run(99)
    assert not torch.equal(named2["weight"], named["weight"])
    loaded_grads, loaded_rngs = load_checkpoint(dest, named_trainable=named2, optimizer=optimizer2, param_names=names2)
    for name in named:
        assert torch.equal(named2[name].detach(), named[name].detach()), name
        assert torch.equal(loaded_grads[name], grads[name]), name
        old, new = optimizer.state[named[name]], optimizer2.state[named2[name]]
        assert old.keys() == new.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in old:
            assert torch.equal(torch.as_tensor(old[key]), torch.as_tensor(new[key])), (name, key)
            assert torch.as_tensor(old[key]).dtype == torch.as_tensor(new[key]).dtype
    assert len(loaded_rngs) == 2
    for a, b in zip(loaded_rngs, rngs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for g1, g2 in zip(optimizer.param_groups, optimizer2.param_groups):
        assert {k: v for k, v in g1.items() if k != "params"} == {k: v for k, v in g2.items() if k != "params"}

    # continuing both runs gives the same weights, bit for bit
    for name in named2:
        named2[name].grad = loaded_grads[name].clone()
    optimizer.step()
    optimizer2.step()
    _train_steps(layer, optimizer, 2, seed=5)
    _train_steps(layer2, optimizer2, 2, seed=5)
    for name in named:
        assert torch.equal(named2[name].detach(), named[name].detach()), name


def test_checkpoint_overwrites_and_leaves_no_temporary(tmp_path: Path) -> None:
    layer, named, names, optimizer = _linear_run(0)
    _train_steps(layer, optimizer, 1, seed=1)
    dest = tmp_path / "step-000001"
    for _ in range(2):
        save_checkpoint(dest, trainable=named, optimizer=optimizer, param_names=names, grads=None,
                        rng_states=[torch.get_rng_state()], state={"cursor": {}}, save_adapter=lambda t: t.mkdir())
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]
    assert (dest / "adapter").is_dir()
    assert read_state(dest)["has_grads"] is False
    grads, rngs = load_checkpoint(dest, named_trainable=named, optimizer=optimizer, param_names=names)
    assert grads == {} and len(rngs) == 1


def test_checkpoint_failure_leaves_nothing(tmp_path: Path) -> None:
    layer, named, names, optimizer = _linear_run(0)

    def broken(target: Path) -> None:
        target.mkdir()
        (target / "partial").write_text("x")
        raise RuntimeError("disk full")

    dest = tmp_path / "step-000003"
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(dest, trainable=named, optimizer=optimizer, param_names=names, grads=None,
                        rng_states=[torch.get_rng_state()], state={}, save_adapter=broken)
    assert list(tmp_path.iterdir()) == []


def test_read_state_rejects_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointInvalid) as caught:
        read_state(empty)
    message = str(caught.value)
    assert "state.json" in message and str(empty) in message
    assert "pass a directory" in message and "checkpoints" in message
    assert caught.value.error_kind == "checkpoint_invalid"

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "state.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointInvalid, match="unknown format 'something-else'") as caught:
        read_state(wrong)
    assert "pass a directory" in str(caught.value)

    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "state.json").write_text("{not json")
    with pytest.raises(CheckpointInvalid, match="not JSON"):
        read_state(garbled)


def test_read_state_requires_the_tensor_files(tmp_path: Path) -> None:
    layer, named, names, optimizer = _linear_run(0)
    dest = save_checkpoint(tmp_path / "c", trainable=named, optimizer=optimizer, param_names=names, grads=None,
                           rng_states=[torch.get_rng_state()], state={})
    (dest / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointInvalid, match="optimizer.safetensors is missing"):
        read_state(dest)


def test_load_checkpoint_rejects_other_parameter_names(tmp_path: Path) -> None:
    layer, named, names, optimizer = _linear_run(0)
    _train_steps(layer, optimizer, 1, seed=1)
    dest = save_checkpoint(tmp_path / "c", trainable=named, optimizer=optimizer, param_names=names, grads=None,
                           rng_states=[torch.get_rng_state()], state={})
    other = torch.nn.Linear(4, 3)
    renamed = {"proj." + n: p for n, p in other.named_parameters()}
    other_opt = torch.optim.AdamW(list(renamed.values()))
    before = other.weight.detach().clone()
    with pytest.raises(CheckpointInvalid, match="do not match") as caught:
        load_checkpoint(dest, named_trainable=renamed, optimizer=other_opt,
                        param_names={id(p): n for n, p in renamed.items()})
    assert "proj.weight" in str(caught.value)
    assert torch.equal(other.weight.detach(), before)

    fewer = {"weight": torch.nn.Parameter(torch.zeros(3, 4))}
    with pytest.raises(CheckpointInvalid, match="do not match"):
        load_checkpoint(dest, named_trainable=fewer, optimizer=torch.optim.AdamW(list(fewer.values())),
                        param_names={id(p): n for n, p in fewer.items()})

    wrong_shape = {"weight": torch.nn.Parameter(torch.zeros(2, 4)), "bias": torch.nn.Parameter(torch.zeros(3))}
    with pytest.raises(CheckpointInvalid, match="shape"):
        load_checkpoint(dest, named_trainable=wrong_shape, optimizer=torch.optim.AdamW(list(wrong_shape.values())),
                        param_names={id(p): n for n, p in wrong_shape.items()})


# ---------------------------------------------------------------- reports

HISTORY = [
    {"step": 1, "epoch": 0.25, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.2, "tokens": 100, "tokens_per_s": 50.0,
     "elapsed_s": 2.0, "val_loss": None},
    {"step": 2, "epoch": 0.5, "loss": 2.0, "lr": 2e-4, "grad_norm": None, "tokens": 200, "tokens_per_s": 55.0,
     "elapsed_s": 3.6, "val_loss": 2.2, "extra": "ignored in csv"},
    {"step": 3, "epoch": 0.75, "loss": float("nan"), "lr": 2e-4, "grad_norm": float("inf"), "tokens": 300,
     "tokens_per_s": 56.0, "elapsed_s": 5.4, "val_loss": None},
    {"step": 4, "epoch": 1.0, "loss": 1.5, "lr": 1e-4, "grad_norm": 0.8, "tokens": 400, "tokens_per_s": 57.0,
     "elapsed_s": 7.0, "val_loss": 1.9},
]


def test_write_metrics_csv_and_json(tmp_path: Path) -> None:
    summary = {"train_loss": 1.5, "val_loss": float("nan"), "best_val_loss": 1.9, "steps": 4, "peak_gpu_bytes": None}
    csv_path, json_path = write_metrics(tmp_path, HISTORY, summary)
    assert csv_path == tmp_path / "metrics.csv" and json_path == tmp_path / "metrics.json"
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == COLUMNS
    assert rows[0][:4] == ["step", "epoch", "loss", "val_loss"]
    assert len(rows) == 1 + len(HISTORY)
    by_name = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert [r["step"] for r in by_name] == ["1", "2", "3", "4"]
    assert by_name[0]["val_loss"] == "" and by_name[1]["val_loss"] == "2.2"
    assert by_name[1]["grad_norm"] == "" and float(by_name[0]["loss"]) == 2.5
    assert "extra" not in rows[0]

    payload = json.loads(json_path.read_text(encoding="utf-8"))  # strict JSON: no NaN literals
    assert "NaN" not in json_path.read_text() and "Infinity" not in json_path.read_text()
    assert payload["summary"] == {"train_loss": 1.5, "val_loss": None, "best_val_loss": 1.9, "steps": 4, "peak_gpu_bytes": None}
    assert len(payload["history"]) == 4
    assert payload["history"][2]["loss"] is None and payload["history"][2]["grad_norm"] is None
    assert payload["history"][1] == {**HISTORY[1]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_plot_loss_writes_a_png_with_train_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    calls: list[tuple[str, list, list]] = []
    original = Axes.plot

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("label"), list(args[0]), list(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    path = plot_loss(tmp_path, HISTORY, "tiny run")
    assert path == tmp_path / "loss_curve.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    labels = {label: (xs, ys) for label, xs, ys in calls}
    assert set(labels) == {"train", "validation"}
    assert labels["train"][0] == [1, 2, 3, 4]
    assert labels["validation"] == ([2, 4], [2.2, 1.9])
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]
