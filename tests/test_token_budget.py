"""Packed runs batch by tokens (`training.pack_tokens`): the plan covers every pair once per epoch, never overfills a
row or a batch, the collator rebuilds its rows, processes share it evenly, and a packed run trains exactly as the
concatenated layout does on the same batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.training.finetune import build_trainer, prepare
from psipo_cli.training.forward import PrefixSharedCollator
from psipo_cli.training.token_budget import TokenBudgetBatches, plan_batches, row_length


def _next_fit_rows(sizes: list[int], budget: int) -> list[list[int]]:
    """How the collator groups a batch's pairs: next fit, in the order given (a closed form, not its code)."""
    rows: list[list[int]] = []
    for size in sizes:
        if not rows or sum(rows[-1]) + size > budget:
            rows.append([])
        rows[-1].append(size)
    return rows


@pytest.mark.parametrize("window", [1, 4, 16])
def test_the_plan_fills_rows_without_overfilling_and_takes_every_pair_once(window: int) -> None:
    rng = random.Random(window)
    sizes = [rng.choice([rng.randint(5, 60), rng.randint(60, 140)]) for _ in range(500)]  # some longer than a row
    order = list(range(500))
    rng.shuffle(order)
    batches = plan_batches(sizes, order, rows=3, budget=100, window=window)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    for batch in batches:
        rows = _next_fit_rows([sizes[i] for i in batch], 100)
        assert len(rows) <= 3
        assert all(sum(row) <= 100 or len(row) == 1 for row in rows)  # a longer pair only alone
    padded = sum(
        len(rows) * max(map(sum, rows)) for rows in (_next_fit_rows([sizes[i] for i in b], 100) for b in batches)
    )
    fixed = [_next_fit_rows([sizes[i] for i in order[k : k + 3]], 100) for k in range(0, 500, 3)]
    assert padded < sum(len(rows) * max(map(sum, rows)) for rows in fixed)  # less than three pairs a batch pads


def test_a_pair_that_does_not_fit_waits_instead_of_closing_the_batch() -> None:
    # One row of 100: 60 goes in, 90 does not fit and waits, 30 still fills the row; then 90, then the last 30.
    assert plan_batches([60, 90, 30, 30], range(4), rows=1, budget=100) == [[0, 2], [1], [3]]
    assert plan_batches([60, 90, 30, 30], range(4), rows=1, budget=100, window=1) == [[0], [1], [2, 3]]


def test_row_length_is_what_the_collator_lays_out() -> None:
    collator = PrefixSharedCollator(pad_token_id=0, max_length=12, row_tokens=1000)
    for prompt, chosen, rejected in [(4, 3, 5), (5, 20, 2), (11, 9, 9)]:
        example = {"prompt_ids": [1] * prompt, "chosen_ids": [2] * chosen, "rejected_ids": [3] * rejected}
        width = collator([example])["input_ids"].size(1)
        assert width == row_length(prompt, chosen, rejected, 12)


def test_epochs_keep_their_length_and_processes_share_the_batches_evenly() -> None:
    sizes = [random.Random(i).randint(10, 90) for i in range(101)]
    one = TokenBudgetBatches(sizes, rows=2, budget=100, shuffle=True, seed=3)
    epochs = []
    for epoch in range(3):
        one.set_epoch(epoch)
        epochs.append(list(one))
        assert len(epochs[-1]) == len(one) and sorted(i for b in epochs[-1] for i in b) == list(range(101))
    assert epochs[0] != epochs[1]  # a new order each epoch, over the same batches
    assert sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1]))
    shards = [
        TokenBudgetBatches(sizes, rows=2, budget=100, shuffle=True, seed=3, processes=3, rank=r) for r in range(3)
    ]
    taken = [list(shard) for shard in shards]
    assert len({len(t) for t in taken}) == 1 and len(taken[0]) == len(shards[0])
    covered = {tuple(b) for t in taken for b in t}
    assert covered == {tuple(b) for b in one.batches}  # the wrap-around repeats batches, it drops none


@pytest.mark.slow
def test_a_packed_run_loads_rows_by_tokens(write_recipe) -> None:
    trainer = build_trainer(
        prepare(load_recipe(write_recipe(), ["training.pack_tokens=96", "training.per_device_train_batch_size=3"]))
    )
    loader = trainer.get_train_dataloader()
    counts = []
    for batch in loader:
        assert batch["input_ids"].size(0) <= 3 and batch["input_ids"].size(1) <= 96
        counts.append(batch["prompt_lengths"].numel())
    assert sum(counts) == len(trainer.train_dataset)  # every pair once
    assert len(set(counts)) > 1 and max(counts) > 3  # as many as fit, more than one per row


@pytest.mark.slow
def test_a_packed_run_trains_as_the_concatenated_layout_on_the_same_batches(
    write_recipe, tmp_path: Path, monkeypatch
) -> None:
    """The packed run's losses, step by step, equal those of an unpacked concatenated run fed the same batches."""
    from psipo_cli.run.directory import read_metrics
    from psipo_cli.training.finetune import run
    from psipo_cli.training.preference import PsipoTrainer

    planned = PsipoTrainer._get_train_sampler
    samplers: list[TokenBudgetBatches] = []

    def keep(self, train_dataset=None):
        sampler = planned(self, train_dataset)
        samplers.append(sampler)
        return sampler

    monkeypatch.setattr(PsipoTrainer, "_get_train_sampler", keep)
    losses = []
    packed = ["training.pack_tokens=96", "training.per_device_train_batch_size=3"]
    out = tmp_path / "packed"
    summary = run(load_recipe(write_recipe(), [*packed, f"output.dir={out}"]))
    assert summary["layout"]["layout"] == "prefix-shared" and summary["layout"]["pack_tokens"] == 96
    assert isinstance(samplers[0], TokenBudgetBatches)
    losses.append([m["loss"] for m in read_metrics(out) if m["split"] == "train"])
    monkeypatch.setattr(PsipoTrainer, "_get_train_sampler", lambda self, train_dataset=None: samplers[0])
    out = tmp_path / "plain"
    run(load_recipe(write_recipe(), ["training.prefix_sharing=false", f"output.dir={out}"]))
    losses.append([m["loss"] for m in read_metrics(out) if m["split"] == "train"])
    assert len(losses[0]) == 4
    for a, b in zip(*losses, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert torch.tensor(losses[0]).std() > 0


def _trainer(write_recipe, out: Path, *overrides: str):
    trainer = build_trainer(prepare(load_recipe(write_recipe(), [*overrides, f"output.dir={out}"])))
    trainer.args.train_sampling_strategy = "sequential"  # the plan in file order, epochs unshuffled
    return trainer


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


@pytest.mark.slow
def test_a_packed_step_weighs_every_pair_alike_across_micro_batches(write_recipe, tmp_path: Path) -> None:
    """Two micro-batches of unequal pair counts per step train as one batch holding both: the same logged loss and
    the same adapter (a mean of the two means would weigh the pairs of the shorter batch more)."""
    packed = ["training.pack_tokens=96", "training.per_device_train_batch_size=2"]
    accumulated = _trainer(write_recipe, tmp_path / "accumulated", *packed, "training.gradient_accumulation_steps=2")
    accumulated.train()
    plan = accumulated.token_batches.batches
    steps = [plan[i] + plan[i + 1] for i in range(0, 8, 2)]  # max_steps 4
    assert any(len(plan[i]) != len(plan[i + 1]) for i in range(0, 8, 2))  # else a mean of means would pass too
    whole = _trainer(write_recipe, tmp_path / "whole", "training.prefix_sharing=false")
    replay = TokenBudgetBatches([1], rows=1, budget=1, shuffle=False, seed=0)
    replay.batches = steps
    whole._get_train_sampler = lambda train_dataset=None: replay
    whole.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (accumulated, whole)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    ours, theirs = _lora(accumulated), _lora(whole)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)


def test_every_epoch_sets_the_plans_order_however_deep_the_sampler_sits(write_recipe, monkeypatch) -> None:
    """A resumed multi-process loader wraps the sampler beyond where the Trainer's set_epoch reaches: psipo sets it
    on the sampler it planned, before the epoch runs."""
    import transformers

    trainer = build_trainer(prepare(load_recipe(write_recipe(), ["training.pack_tokens=96"])))
    trainer.get_train_dataloader()
    seen: list[int] = []
    monkeypatch.setattr(
        transformers.Trainer, "_run_epoch", lambda self, *args, epoch, **kwargs: seen.append(self.token_batches.epoch)
    )
    trainer._run_epoch(model=None, epoch=3)
    assert seen == [3]


def test_a_packed_run_resumes_only_with_the_same_split_of_its_rows() -> None:
    """Packed batches are planned per micro-batch and dealt to processes: the same rows per optimizer step split
    otherwise would train later steps on other pairs, so the fingerprint tells them apart; unpacked runs may."""
    from types import SimpleNamespace

    from psipo_cli.recipe.schema import Recipe
    from psipo_cli.run.fingerprint import differences, run_fingerprint
    from tests.conftest import tiny_recipe

    def fingerprint(batch: int, accumulation: int, processes: int, pack: int | None) -> dict:
        training = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
        recipe = Recipe.model_validate(tiny_recipe(Path("/tmp/x"), training={**training, "pack_tokens": pack}))
        return run_fingerprint(recipe, SimpleNamespace(fingerprint="data"), processes)

    assert not differences(fingerprint(4, 1, 2, None), fingerprint(2, 2, 2, None))  # same pairs per step
    assert not differences(fingerprint(4, 1, 2, 96), fingerprint(4, 1, 2, 96))
    for other in [(2, 2, 2), (8, 1, 1), (4, 2, 1)]:
        assert [key for key, _ in differences(fingerprint(4, 1, 2, 96), fingerprint(*other, 96))] == [
            "packed batches (rows, accumulation, processes)"
        ]
