"""The recipe's training settings as a TRL config: one mapping for every stage's config class."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from psipo_cli.recipe.schema import Recipe
from psipo_cli.training.distributed import deepspeed_config

PSIPO_KEYS = {"eval_steps", "prefix_sharing", "pack_tokens", "save_total_limit", "max_bad_steps"}


def trainer_arguments(config_class: type, recipe: Recipe, has_eval: bool, **stage_specific: Any) -> Any:
    """`config_class` (DPOConfig, RewardConfig, ...) from the recipe: training.* by name, the rest mapped here.

    Dropout stays on in TRL's sense (`disable_dropout=False`): TRL's switch would zero `adapter.dropout` too, so
    `models.loading.disable_base_dropout` turns every other dropout off after the trainer is built.
    """
    # psipo's own keys; save_total_limit: psipo deletes old checkpoints itself, once the new one is sealed
    training = recipe.training.model_dump(exclude=PSIPO_KEYS)
    if "max_length" in {f.name for f in dataclasses.fields(config_class)}:  # the sampling stages' is per response
        training["max_length"] = recipe.data.max_length
    return config_class(
        output_dir=recipe.output.dir,
        deepspeed=deepspeed_config(recipe.distributed),
        report_to=[r for r in recipe.output.report_to if r != "none"] or "none",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.training.eval_steps or recipe.training.logging_steps,
        save_strategy="steps",
        disable_dropout=False,
        use_cpu=not torch.cuda.is_available(),
        **{**training, **stage_specific},  # a stage may say what a training key means for it (batch sizes)
    )
