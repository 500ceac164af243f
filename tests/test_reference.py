"""The precomputed reference is cached by what determines it: a τ sweep reuses it, a changed model does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.training.finetune import build_trainer, prepare
from psipo_cli.training.preference import PsipoTrainer
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.slow


def _build(write_recipe, *overrides: str):
    return build_trainer(prepare(load_recipe(write_recipe(), ["objective.precompute_ref_log_probs=true", *overrides])))


def test_a_sweep_over_training_settings_reuses_the_reference(write_recipe, tmp_path: Path, monkeypatch) -> None:
    import datasets

    # A cache of this test's own: the machine's may hold this very key from an earlier run.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    first = _build(write_recipe, "data.max_length=60")
    assert first.reference_cache_hits == {"train": False}

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference pass ran again instead of reading the cache")

    monkeypatch.setattr(PsipoTrainer, "compute_ref_log_probs", must_not_run)
    again = _build(
        write_recipe,
        "data.max_length=60",
        "objective.tau=2.0",
        "objective.loss=dpo",
        "training.learning_rate=1e-4",
        "training.seed=7",
        f"output.dir={tmp_path / 'elsewhere'}",
    )
    assert again.reference_cache_hits == {"train": True}
    assert again.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]


def test_a_base_model_retrained_in_place_gets_a_new_reference(write_recipe, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model_dir)
    first = _build(write_recipe, f"model.name_or_path={model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # "retrained": same path, same names, other weights
    model.save_pretrained(model_dir)
    second = _build(write_recipe, f"model.name_or_path={model_dir}")
    assert second.reference_cache_hits == {"train": False}
    assert second.train_dataset["ref_chosen_logps"] != first.train_dataset["ref_chosen_logps"]
