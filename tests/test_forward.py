"""Prefix sharing is exact: the `[prompt | chosen | p' | rejected]` row gives the concatenated layout's
per-sequence log-probs, loss and gradients (fp32, within 1e-5), on the tiny model and the shipped data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.training.finetune import build_trainer, prepare
from psipo_cli.training.forward import ConcatenatedForward, PrefixSharedForward

pytestmark = pytest.mark.slow


def _trainer(write_recipe, prefix: bool, *overrides: str):
    recipe = load_recipe(write_recipe(), [f"training.prefix_sharing={str(prefix).lower()}", *overrides])
    return build_trainer(prepare(recipe))


def _batches(trainer, count: int = 3) -> list[list[dict]]:
    data = trainer.train_dataset
    return [[data[i] for i in range(start, start + 8)] for start in range(0, 8 * count, 8)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [64, 24], ids=["whole", "truncated"])
def test_prefix_shared_log_probs_equal_the_concatenated_ones(write_recipe, attn: str, max_length: int) -> None:
    trainer = _trainer(write_recipe, False, f"model.attn_implementation={attn}", f"data.max_length={max_length}")
    model = trainer.model.eval()
    concat, shared = ConcatenatedForward(), PrefixSharedForward()
    for examples in _batches(trainer):
        with torch.no_grad():
            a = concat(model, concat.collator(0, max_length)(examples))
            b = shared(model, shared.collator(0, max_length)(examples))
        for x, y in ((a.chosen, b.chosen), (a.rejected, b.rejected)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.chosen_tokens, b.chosen_tokens) and torch.equal(a.rejected_tokens, b.rejected_tokens)
        batch_a, batch_b = concat.collator(0, max_length)(examples), shared.collator(0, max_length)(examples)
        assert concat.count_tokens(batch_a) == shared.count_tokens(batch_b)


def test_prefix_shared_loss_and_gradients_equal_the_concatenated_ones(write_recipe) -> None:
    shared_trainer = _trainer(write_recipe, True)
    concat_trainer = _trainer(write_recipe, False)
    concat_trainer.model.load_state_dict(shared_trainer.model.state_dict())  # the same LoRA init
    examples = _batches(shared_trainer, 1)[0]
    results = []
    for trainer in (shared_trainer, concat_trainer):
        trainer.model.train()
        trainer.model.zero_grad()
        inputs = trainer.data_collator(examples)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)


def test_training_with_prefix_sharing_follows_the_concatenated_run(write_recipe, tmp_path: Path) -> None:
    from psipo_cli.run.directory import read_metrics
    from psipo_cli.training.finetune import run

    losses = []
    for prefix in (True, False):
        out = tmp_path / f"run-{prefix}"
        recipe = load_recipe(write_recipe(), [f"training.prefix_sharing={str(prefix).lower()}", f"output.dir={out}"])
        run(recipe)
        losses.append([m["loss"] for m in read_metrics(out) if m["split"] == "train"])
    assert len(losses[0]) == 4
    for a, b in zip(*losses, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_precomputed_reference_is_cached_and_reused_on_a_rerun(write_recipe, monkeypatch) -> None:
    from psipo_cli.training.preference import PsipoTrainer

    recipe = load_recipe(write_recipe(), ["objective.precompute_ref_log_probs=true"])
    first = build_trainer(prepare(recipe))
    assert "ref_chosen_logps" in first.train_dataset.column_names

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference pass ran again instead of reading the cache")

    monkeypatch.setattr(PsipoTrainer, "compute_ref_log_probs", must_not_run)
    again = build_trainer(prepare(recipe))  # same model, data and settings: the cache answers
    assert again.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]
