"""Recipe keys of the stages that sample from the policy while training (rlhf, online_psipo): the `rollout:`
section, and the settings those stages cannot run with. Part of the one schema (`schema.Recipe.rollout`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from psipo_cli.errors import UserError
from psipo_cli.objectives import resolve_psi
from psipo_cli.recipe.section import Section

if TYPE_CHECKING:
    from psipo_cli.recipe.schema import Recipe


class RolloutSection(Section):
    """Sampling from the policy while training: the rlhf and online_psipo stages (on TRL's RLOOTrainer)."""

    reward_model: str = Field(
        description="Run directory of a psipo reward model (objective.loss: reward) on the same base model; "
        "relative paths are taken from the working directory, like output.dir."
    )
    responses_per_prompt: int = Field(
        2,
        ge=2,
        description="Responses sampled per prompt each step: RLOO's k (its leave-one-out baseline needs 2 or more); "
        "online_psipo samples one pair, 2.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled response in tokens; prompt + it ≤ max_length.")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature. 1 samples π itself; otherwise the log-probs of the loss and the KL are "
        "those of the tempered policy, as in TRL.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="rlhf: PPO clip range ε of the surrogate (TRL's epsilon).")
    iterations: int = Field(
        1, ge=1, description="Optimisation passes over each batch of samples before sampling again (PPO's μ)."
    )
    label: Literal["soft", "bernoulli"] = Field(
        "soft",
        description="online_psipo: the label p̂ = σ(r(y) − r(y′)) itself, or a draw of 1 (y preferred) with that "
        "probability, as from one annotator.",
    )
    mixture: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="online_psipo: sample from the geometric mixture π^(1−β)·π_ref^β with β = mixture (IPO-MD); "
        "0 samples π (online IPO).",
    )


SAMPLING_LOSSES = ("rlhf", "online_psipo")  # the stages that sample from the policy (rollout section)
ONLINE_ONLY = ("label", "mixture")  # rollout keys of online_psipo
RLHF_ONLY = ("clip_epsilon",)


def check_rollout(recipe: Recipe, rollout: RolloutSection) -> None:
    """Settings the sampling stages cannot run with, each named by its key (UserError passes through pydantic)."""
    loss = recipe.objective.loss
    # A value other than the default, not a key present: a run's recipe.yaml spells out every default.
    fields = RolloutSection.model_fields
    keys = RLHF_ONLY if loss == "online_psipo" else ONLINE_ONLY
    foreign = [k for k in keys if getattr(rollout, k) != fields[k].default]
    if foreign:
        raise UserError(
            f"applies to {'rlhf' if loss == 'online_psipo' else 'online_psipo'} only", f"rollout.{foreign[0]}"
        )
    if loss == "online_psipo" and rollout.responses_per_prompt != 2:
        raise UserError("online_psipo samples one pair per prompt: 2", where="rollout.responses_per_prompt")
    if loss == "online_psipo" and rollout.label == "bernoulli" and not resolve_psi(recipe.objective.psi).linear:
        # Proposition 3 (a hard label drawn with probability p̂ is unbiased) holds for a linear Ψ(q) − Ψ(1 − q).
        raise UserError("a non-linear Ψ needs the soft label, not a draw", where="rollout.label")
    if rollout.max_new_tokens >= recipe.data.max_length:
        raise UserError(
            f"must leave room for the prompt within data.max_length={recipe.data.max_length}",
            where="rollout.max_new_tokens",
        )
    if recipe.data.columns.has_labels:
        raise UserError("the sampling stages label their own samples with the reward model", "data.columns")
    if loss == "rlhf" and recipe.objective.psi != "identity":
        raise UserError("rlhf has no Ψ: it maximises the reward model's r (eq. 6)", where="objective.psi")
    if recipe.adapter.dropout:
        # Samples, their log-probs at sampling time (RLOO's ratio, the KL) and the loss pass must see one policy:
        # dropout would draw a different one each pass, and the clip would fire on noise.
        raise UserError(
            "must be 0 for the sampling stages (the sampled and the scored policy must be one)", "adapter.dropout"
        )
    if recipe.objective.precompute_ref_log_probs:
        raise UserError("the samples are new every step: nothing to precompute", "objective.precompute_ref_log_probs")
    if recipe.training.prefix_sharing is True:
        raise UserError(
            "prefix sharing lays out preference pairs; sampled responses use TRL's", "training.prefix_sharing"
        )
    if loss == "rlhf" and recipe.objective.logps is not None:
        raise UserError("rlhf's KL (eq. 6) is over whole sequences: a sum, not set here", where="objective.logps")
