"""Batches by tokens where pairs are packed (`training.pack_tokens`): each step fills `per_device_train_batch_size`
rows of at most `pack_tokens` tokens with as many pairs as fit, instead of taking a fixed number of pairs.

A fixed pair count packs badly when lengths vary: four UltraFeedback-like pairs of ~700 tokens fill four rows of
1024 to ~70% and every row is padded to the longest. Filling rows by tokens keeps the padding to the rows' ragged
ends (`bench/shapes.py`: 4% on UltraFeedback-like lengths with 2 rows of 1536, against 23% for four pairs a step in
the same rows). A step then holds a varying number of pairs; its loss is the mean over all of them.

The plan is made once, from the pairs' lengths, before training: pairs are taken in the sampler's order (seeded, or
file order where `train_sampling_strategy` is sequential) and placed first-fit into the batch's rows; a pair that
fits no row waits for the next batch while up to `WINDOW` later pairs are tried, so a long pair does not close a
half-empty batch. Each epoch walks the same batches in a new seeded order, so every epoch has the same number of
steps (the Trainer sizes its schedule from the first). The collator packs a batch's pairs next-fit in the order
given, which rebuilds exactly these rows because each batch lists its pairs row by row (`plan_batches`).

`PackedTraining` holds the trainer's side: the sampler, each epoch's order, and the loss weighting that makes a
step's loss the mean over all its pairs however they fall into micro-batches (accumulation) and processes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow.compute as pc
import torch
from torch import Tensor
from transformers.trainer_pt_utils import BatchRebalanceSampler

from psipo_cli.training.forward import PrefixSharedCollator

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
    keys = ["prompt_ids", "chosen_ids", "rejected_ids"]
    table = dataset.select_columns(keys).with_format("arrow")[:]  # rows as the sampler indexes them, ids only
    counts = [pc.list_value_length(table[key]).to_pylist() for key in keys]
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
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(sizes), generator=generator).tolist() if shuffle else range(len(sizes))
        self.batches = plan_batches(sizes, order, rows, budget)
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


class PackedTraining:
    """Trainer overrides for packed runs, mixed in before TRL's DPOTrainer (a no-op where the collator does not pack).

    - `_get_train_sampler`: the planned batches (`TokenBudgetBatches`).
    - `_run_epoch`: sets the sampler's epoch itself. transformers reaches a batch sampler's `set_epoch` at most
      two wrappers deep; a multi-process run resumed mid-epoch nests it three deep (skip_first_batches around
      accelerate's shard wrapper), and the rest of the epoch would follow epoch 0's order.
    - `_get_num_items_in_batch` and `step_loss`: with batches of unequal pair counts, the mean of each micro-batch's
      mean would weigh a pair in a short batch (long pairs) more than one in a full batch; instead each micro-batch
      contributes its pairs' sum over the step's pair count, gathered over processes.
    - `gather_pairs`: per-pair metrics from processes whose batches hold different numbers of pairs.
    """

    # Every micro-batch's loss is divided by the accumulation steps by the Trainer (`step_loss` relies on it).
    loss_is_scaled_for_ga = False
    token_batches: TokenBudgetBatches | None = None

    @property
    def packs(self) -> bool:
        return isinstance(self.data_collator, PrefixSharedCollator) and self.data_collator.row_tokens is not None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if not self.packs:
            return super()._get_train_sampler(train_dataset)
        args, collator = self.args, self.data_collator
        self.token_batches = TokenBudgetBatches(
            row_lengths(train_dataset if train_dataset is not None else self.train_dataset, collator.max_length),
            rows=args.per_device_train_batch_size,
            budget=collator.row_tokens,
            shuffle=args.train_sampling_strategy != "sequential",
            seed=args.data_seed if args.data_seed is not None else args.seed,
            processes=args.world_size,
            rank=args.process_index,
        )
        return self.token_batches

    def _run_epoch(self, *args: Any, epoch: int, **kwargs: Any) -> Any:
        if self.token_batches is not None:
            self.token_batches.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: Any) -> Any:
        if not self.packs:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = torch.tensor([sum(batch["prompt_lengths"].numel() for batch in batch_samples)], device=device)
        return self.accelerator.gather(count).sum() if self.accelerator.num_processes > 1 else count.sum()

    def step_loss(self, losses: Tensor, num_items_in_batch: Any) -> Tensor:
        """This micro-batch's loss: the mean of `losses`, or in a packed training step its pairs' share of the mean
        over all the step's pairs. The Trainer divides by the accumulation steps and DDP/DeepSpeed average over
        processes, so both are multiplied back in."""
        if num_items_in_batch is None or not self.packs:
            return losses.mean()
        scale = self.current_gradient_accumulation_steps * self.accelerator.num_processes
        return losses.sum() * scale / num_items_in_batch

    def gather_pairs(self, value: Tensor, mode: str) -> Tensor:
        """A (pairs, ...) tensor from every process. gather_for_metrics needs one size everywhere (and drops the
        pairs an evaluation sampler repeated); packed training batches hold as many pairs as fit, so their values are
        padded to the largest count, gathered, and cut back. The batches the last round deals out again so that every
        process takes as many (`TokenBudgetBatches`) are counted again, as they are trained on again."""
        if mode == "eval" or self.accelerator.num_processes == 1 or not self.packs:
            return self.accelerator.gather_for_metrics(value)
        counts = self.accelerator.gather(torch.tensor([value.size(0)], device=value.device)).tolist()
        padded = self.accelerator.gather(self.accelerator.pad_across_processes(value, dim=0))
        per_process = padded.view(len(counts), -1, *value.shape[1:])
        return torch.cat([rows[:n] for rows, n in zip(per_process, counts, strict=True)])
