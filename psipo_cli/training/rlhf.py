"""The paper's RLHF baseline, stage two (eq. 6): maximise E_{y~π}[r(y)] − τ·KL(π ‖ π_ref) with r a psipo reward run.

Built on TRL's RLOOTrainer rather than GRPOTrainer because RLOO optimises eq. 6 as written: the KL enters each
response's reward, per sequence (Σ_t log π(y_t|·) − log π_ref(y_t|·) over the sampled response), with τ as TRL's
β, and a leave-one-out baseline over the k responses of a prompt replaces PPO's learned critic (Ahmadian et al.
2024). GRPO instead adds a per-token KL estimate to the loss and divides advantages by the group's reward spread,
neither of which is eq. 6. The policy update is PPO's clipped surrogate (ε = rollout.clip_epsilon, μ =
rollout.iterations passes per batch of samples). The policy is the LoRA adapter and π_ref the base with the
adapter off (TRL's PEFT path), so no second copy of the weights is held; the reward model is loaded once, frozen.
"""

from __future__ import annotations

from typing import Any, ClassVar

from trl import RLOOTrainer

from psipo_cli.training.inputs import Prepared
from psipo_cli.training.rollout import ResumableSamples, build_sampling_trainer


class RlhfTrainer(ResumableSamples, RLOOTrainer):
    """TRL's RLOOTrainer, also logging the KL of eq. 6 itself: per sequence, not TRL's per-token mean."""

    _tag_names: ClassVar[list[str]] = ["trl", "rloo", "psipo"]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        metrics = self._metrics["train" if self.model.training else "eval"]
        # TRL logs Σ KL over the batch's response tokens / their number, and their mean length; the product is the
        # mean over responses of each one's Σ_t log π/π_ref, exactly (this batch's values, before log averages them).
        metrics["kl_sequence"].append(metrics["kl"][-1] * metrics["completions/mean_length"][-1])
        return output


def build_rlhf_trainer(prepared: Prepared, model: Any = None) -> RlhfTrainer:
    """The rlhf stage's trainer: τ is RLOO's β on the sequence KL, ε its clip range."""
    rollout = prepared.recipe.rollout
    assert rollout is not None
    arguments = {"beta": prepared.recipe.objective.tau, "epsilon": rollout.clip_epsilon}
    return build_sampling_trainer(RlhfTrainer, prepared, model, arguments)
