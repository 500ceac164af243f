"""The training stages `psipo finetune` runs, in one table keyed by `objective.loss` (as `objectives.OBJECTIVES`
keys the loss functions): adding a stage is adding an entry, never another branch in `finetune`.

A stage says how a data split is read (`load`: preference pairs, or the prompts a sampling stage samples from),
how its data is made ready after the shared checks (`prepare`), how its trainer is built (`build`) and what it
checks on the built trainer before the banner reports it (`ready`: the preference stage's layout self-check).
`Prepared` lives in `inputs.py`, which the stages' own modules import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psipo_cli.data.pairs import PreferenceData, load_split
from psipo_cli.data.prompts import load_prompts
from psipo_cli.errors import UserError
from psipo_cli.recipe.schema import Recipe
from psipo_cli.training.inputs import Prepared
from psipo_cli.training.online import build_online_trainer
from psipo_cli.training.preference import PsipoTrainer, build_preference_trainer
from psipo_cli.training.reward import build_reward_trainer, prepare_reward_data
from psipo_cli.training.rlhf import build_rlhf_trainer
from psipo_cli.training.rollout import prepare_rollout


@dataclass(frozen=True)
class Stage:
    name: str  # what the stage trains, for messages
    build: Callable[[Prepared, Any], Any]  # (prepared, model or None) -> a transformers Trainer
    load: Callable[[Recipe, Any, str], PreferenceData] = load_split  # (recipe, tokenizer, "train"/"eval")
    prepare: Callable[[Prepared], Prepared] = lambda prepared: prepared  # stage-specific data step
    ready: Callable[[Any], None] = lambda trainer: None  # checks on the built trainer, before the banner


# The preference objectives share a stage: they differ only in the loss function the trainer calls.
PREFERENCE = Stage("a policy on preference pairs", build_preference_trainer, ready=PsipoTrainer.check_layout)
REWARD = Stage("a Bradley–Terry reward model", build_reward_trainer, prepare=prepare_reward_data)
RLHF = Stage("a policy against a reward model (RLOO)", build_rlhf_trainer, load_prompts, prepare_rollout)
ONLINE = Stage("a policy on pairs it samples (online ΨPO)", build_online_trainer, load_prompts, prepare_rollout)
STAGES: dict[str, Stage] = {
    "dpo": PREFERENCE,
    "ipo": PREFERENCE,
    "psipo": PREFERENCE,
    "reward": REWARD,
    "rlhf": RLHF,
    "online_psipo": ONLINE,
}


def stage_for(loss: str) -> Stage:
    if loss not in STAGES:  # the schema only admits known losses; a new loss needs its stage here too
        raise UserError(f"no training stage for objective.loss={loss}; known: {sorted(STAGES)}", where="objective.loss")
    return STAGES[loss]
