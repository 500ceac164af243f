"""`psipo finetune` picks its trainer from one table keyed by objective.loss."""

from __future__ import annotations

import typing

from psipo_cli.recipe.schema import ObjectiveSection
from psipo_cli.training.preference import PsipoTrainer
from psipo_cli.training.stages import STAGES, stage_for


def test_every_objective_the_schema_admits_has_a_training_stage() -> None:
    losses = typing.get_args(ObjectiveSection.model_fields["loss"].annotation)
    assert set(losses) == set(STAGES)


def test_the_preference_objectives_share_one_stage_and_check_their_layout() -> None:
    assert stage_for("dpo") is stage_for("ipo") is stage_for("psipo")
    assert stage_for("ipo").ready is PsipoTrainer.check_layout
    assert stage_for("reward") is not stage_for("ipo")
