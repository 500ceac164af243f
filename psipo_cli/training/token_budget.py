"""Batches by tokens where pairs are packed (`training.pack_tokens`): each step fills `per_device_train_batch_size`
rows of at most `pack_tokens` tokens with as many pairs as fit, instead of taking a fixed number of pairs.

A fixed pair count packs badly when lengths vary: four UltraFeedback-like pairs of ~700 tokens fill four rows of
1024 to ~70% and every row is padded to the longest. Filling rows by tokens keeps the padding to the rows' ragged
ends (`bench/`: about 4% on UltraFeedback-like lengths with 2 rows of 1536, against 34% for four pairs in rows of
1024). A step then holds a varying number of pairs; its loss is their mean, as for any batch.

The plan is made once, from the pairs' lengths, before training: pairs are taken in the sampler's order (seeded, or
file order where `train_sampling_strategy` is sequential) and placed first-fit into the batch's rows; a pair that
fits no row waits for the next batch while up to `WINDOW` later pairs are tried, so a long pair does not close a
half-empty batch. Each epoch walks the same batches in a new seeded order, so every epoch has the same number of
steps (the Trainer sizes its schedule from the first). The collator packs a batch's pairs next-fit in the order
given, which rebuilds exactly these rows because each batch lists its pairs row by row (`plan_batches`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow.compute as pc
import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

# Later pairs tried for a batch's free room before it closes. 16 reaches ~96% fill on UltraFeedback-like lengths in
# rows of 1536 (4 reaches ~94%, 1 ~90%), while pairs move at most a few batches from their place in the order.
WINDOW = 16


def row_length(prompt: int, chosen: int, rejected: int, max_length: int | None) -> int:
    """Tokens a pair takes in a shared row `[prompt | chosen | p' | rejected]` after truncating each response to
    `max_length` with its prompt, as the collator does (`forward.PrefixSharedCollator`)."""
    if max_length is not None:
        room = max_length - prompt
        chosen, rejected = min(chosen, room), min(rejected, room)
    return prompt + chosen + 1 + rejected


def row_lengths(dataset: Any, max_length: int | None) -> list[int]:
    """Every pair's `row_length`, read from the tokenised dataset's Arrow columns (no Python lists of token ids)."""
    table = dataset.with_format("arrow")[:]
    counts = [pc.list_value_length(table[key]).to_pylist() for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return [row_length(*pair, max_length) for pair in zip(*counts, strict=True)]


def plan_batches(
    sizes: Sequence[int], order: Sequence[int], rows: int, budget: int, window: int = WINDOW
) -> list[list[int]]:
    """Pairs (indices into `sizes`) grouped into batches of at most `rows` rows of at most `budget` tokens each.

    First fit in `order`: a pair goes into the first row with room, or opens a new row while the batch has fewer than
    `rows`; a pair longer than `budget` gets a row of its own. A pair that fits nowhere waits, in order, for the next
    batch; the batch closes after `window` such pairs or when no pairs are left. Each batch lists its pairs row by
    row, rows in the order they were opened: packing that list next-fit gives back the same rows, since a pair that
    opened a row did not fit the rows before it when it was placed, and those rows only filled up afterwards.
    """
    pending, batches = deque(order), []
    while pending:
        loads: list[int] = []
        members: list[list[int]] = []
        waiting: list[int] = []
        while pending and len(waiting) < window:
            index = pending.popleft()
            size = sizes[index]
            row = next((r for r, load in enumerate(loads) if load + size <= budget), None)
            if row is None and len(loads) < rows:
                loads.append(0)
                members.append([])
                row = len(loads) - 1
            if row is None:
                waiting.append(index)
                continue
            loads[row] += size
            members[row].append(index)
        pending.extendleft(reversed(waiting))
        batches.append([index for row in members for index in row])
    return batches


class TokenBudgetBatches(BatchRebalanceSampler):
    """The training data loader's batch sampler where pairs are packed: the planned batches, shared out over the
    processes (process r takes batches r, r + P, …; the last round wraps around to the first batches so that every
    process takes the same number and none waits at a collective for another).

    A `BatchRebalanceSampler` only by type: transformers hands an instance of that class to the DataLoader as its
    batch sampler, keeps accelerate from sharding it a second time and calls `set_epoch` on it, which is the contract
    a rank-aware batch sampler needs (`trl_internals.HOOKS` checks it). Nothing of its algorithm is used.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        rows: int,
        budget: int,
        shuffle: bool,
        seed: int,
        processes: int = 1,
        rank: int = 0,
    ) -> None:
        order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else None
        self.batches = plan_batches(sizes, order if order is not None else range(len(sizes)), rows, budget)
        self.shuffle, self.seed, self.processes, self.rank = shuffle, seed, processes, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.processes)

    def __iter__(self) -> Iterator[list[int]]:
        count = len(self.batches)
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(count))
        order += order[: len(self) * self.processes - count]  # every process the same number of batches
        for index in order[self.rank :: self.processes]:
            yield self.batches[index]
