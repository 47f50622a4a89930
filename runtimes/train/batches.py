"""The order examples are trained in and the tensors each micro-batch becomes.

The plan is a pure function of (examples, seed, epoch, world size), so a resumed run only needs
to know where it stopped. Micro-batches hold a fixed number of examples (`batch_size`, so examples
per optimizer step are what the user asked for) or as many as fit a token budget
(`batch_tokens`, packing short examples into full sequences). Either way a packed micro-batch
is one flat row with position ids restarting per example and attention confined to each example
(runtimes/train/packed_attention.py), so no compute is spent on padding. Unpacked micro-batches are
grouped by length and padded to the longest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Tokenized(Protocol):
    input_ids: list[int]
    loss_mask: list[bool]


@dataclass(frozen=True)
class PlanOptions:
    batch_size: int
    batch_tokens: int | None
    packing: bool
    world_size: int = 1


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch(lengths: Sequence[int], seed: int, epoch: int, options: PlanOptions) -> list[list[list[int]]]:
    """Global micro-batches for one epoch, each already split into one shard per process."""
    order = epoch_order(len(lengths), seed, epoch)
    if options.batch_tokens:
        return _sharded_by_token_budget(order, lengths, options.batch_tokens, options.world_size)
    else:
        groups = [order[i:i + options.batch_size * options.world_size] for i in range(0, len(order), options.batch_size * options.world_size)]
        if not options.packing:
            groups = _length_grouped(groups, lengths, options.batch_size * options.world_size)
    return [_shard(group, lengths, options.world_size) for group in groups]


def plan_eval(lengths: Sequence[int], batch_tokens: int, world_size: int) -> list[list[list[int]]]:
    """Validation batches: longest first into token budgets (no shuffling, nothing trained)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return _sharded_by_token_budget(order, lengths, batch_tokens, world_size)


def _sharded_by_token_budget(order: list[int], lengths: Sequence[int], budget: int, world_size: int) -> list[list[list[int]]]:
    """Global micro-batches in which no process's share exceeds `budget` tokens (an example longer
    than the budget goes alone): each example joins the least-loaded share it fits in, and the
    micro-batch closes when it fits in none."""
    groups: list[list[list[int]]] = []
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in order:
        fitting = [r for r in range(world_size) if not shards[r] or loads[r] + lengths[index] <= budget]
        if not fitting:
            groups.append(shards)
            shards, loads = [[] for _ in range(world_size)], [0] * world_size
            fitting = list(range(world_size))
        rank = min(fitting, key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += lengths[index]
    if any(shards):
        groups.append(shards)
    return groups


def _length_grouped(groups: list[list[int]], lengths: Sequence[int], size: int, window: int = 50) -> list[list[int]]:
    """Sort within windows of `window` batches by length, so padded batches hold similar lengths
    while the epoch stays shuffled at the window scale (the trick of HF's group_by_length)."""
    flat = [i for group in groups for i in group]
    span = size * window
    regrouped: list[list[int]] = []
    for start in range(0, len(flat), span):
        chunk = sorted(flat[start:start + span], key=lambda i: -lengths[i])
        regrouped += [chunk[i:i + size] for i in range(0, len(chunk), size)]
    return regrouped


def _shard(group: list[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split a global micro-batch across processes with balanced token counts (deterministically)."""
    if world_size == 1:
        return [list(group)]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in sorted(group, key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += lengths[index]
    return shards


def count_targets(examples: Sequence[Tokenized], indices: Sequence[int]) -> int:
    """Tokens predicted with a loss: a masked-in token that has a token before it in its example."""
    return sum(sum(examples[i].loss_mask[1:]) for i in indices)


@dataclass
class Batch:
    input_ids: Any  # LongTensor [rows, length]
    position_ids: Any  # LongTensor [rows, length]
    attention_mask: Any | None  # padded batches only
    segments: list[tuple[int, int]] | None  # packed rows only: [start, end) of each example
    predict_at: Any  # LongTensor: flat positions whose hidden state predicts a target
    targets: Any  # LongTensor: the token ids to predict there
    tokens: int  # real (non-padding) tokens
    padded_tokens: int  # what the forward pass computes


def collate(examples: Sequence[Tokenized], indices: Sequence[int], packing: bool, pad_id: int) -> Batch:
    import torch

    if not indices:
        empty = torch.zeros((1, 0), dtype=torch.long)
        return Batch(empty, empty, None, [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0, 0)
    chosen = [examples[i] for i in indices]
    if packing:
        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int]] = []
        predict_at: list[int] = []
        targets: list[int] = []
        for example in chosen:
            start = len(ids)
            _collect_targets(example, start, predict_at, targets)
            ids += example.input_ids
            positions += range(len(example.input_ids))
            segments.append((start, len(ids)))
        return Batch(torch.tensor([ids]), torch.tensor([positions]), None, segments,
                     torch.tensor(predict_at, dtype=torch.long), torch.tensor(targets, dtype=torch.long), len(ids), len(ids))
    width = max(len(example.input_ids) for example in chosen)
    input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
    predict_at = []
    targets = []
    for row, example in enumerate(chosen):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        _collect_targets(example, row * width, predict_at, targets)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    tokens = int(attention_mask.sum())
    return Batch(input_ids, position_ids, attention_mask, None, torch.tensor(predict_at, dtype=torch.long),
                 torch.tensor(targets, dtype=torch.long), tokens, len(chosen) * width)


def _collect_targets(example: Tokenized, offset: int, predict_at: list[int], targets: list[int]) -> None:
    ids = example.input_ids
    for j in range(1, len(ids)):
        if example.loss_mask[j]:
            predict_at.append(offset + j - 1)
            targets.append(ids[j])
