"""Online ΨPO (Calandriello et al. 2024, arXiv 2403.08635): ΨPO on pairs the current policy samples each step.

For each prompt two responses y, y′ are sampled from π (or, with rollout.mixture = β > 0, from the geometric
mixture π^(1−β)·π_ref^β: IPO-MD), gradients stopped through the sampling; the reward model labels the pair
p̂ = σ(r(y) − r(y′)) (Bradley–Terry, eq. 4), or a draw of 1 with that probability (rollout.label: bernoulli); and
the loss is the very `pair_losses` of `objectives` on h(y, y′), so identity Ψ regresses h to (p̂ − ½)/τ: online
IPO, whose fixed point is the KL-regularised Nash equilibrium π*(y) ∝ π_ref(y)·exp(P(y ≻ π*)/τ) when h is
made of sequence log-probs (objective.logps: sum, this stage's default).

TRL's RLOOTrainer does the sampling, the reward calls, the reuse of a batch for rollout.iterations passes and the
sampler that keeps a prompt's responses together on one process; this trainer owns what it hands the loss step
(pairs, their reference log-probs and labels) and the loss step itself. TRL's experimental OnlineDPOTrainer with
loss_type="ipo" is not this: it takes the higher-scored response as the winner (a hard label) and sums log-probs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from trl import RLOOTrainer
from trl.models.utils import disable_gradient_checkpointing

from psipo_cli.models.loading import use_adapter
from psipo_cli.objectives import margin, pair_losses, sequence_logps
from psipo_cli.recipe.schema import ObjectiveSection, RolloutSection
from psipo_cli.training.inputs import Prepared
from psipo_cli.training.mixture import MixtureSampling
from psipo_cli.training.rollout import ResumableSamples, build_sampling_trainer


def _pairs(t: Tensor) -> Tensor:
    """(2P, ...) rows, the two responses of a prompt adjacent, as (P, 2, ...)."""
    return t.view(-1, 2, *t.shape[1:])


class OnlinePsipoTrainer(MixtureSampling, ResumableSamples, RLOOTrainer):
    """Samples two responses per prompt, labels them with the reward model, and trains on `objectives.pair_losses`."""

    _tag_names: ClassVar[list[str]] = ["trl", "online-psipo", "psipo"]

    def __init__(self, *args: Any, objective: ObjectiveSection, rollout: RolloutSection, **kwargs: Any) -> None:
        self.objective, self.rollout = objective, rollout
        super().__init__(*args, **kwargs)

    def _reference(self) -> Any:
        """π_ref: the adapter off, or the frozen copy of a starting adapter (TRL's "ref" adapter)."""
        model = self.accelerator.unwrap_model(self.model)
        return use_adapter(model, "ref" if "ref" in model.peft_config else None)

    def _calculate_rewards(self, inputs: Any, prompts: list, completions: list, completion_ids_list: list) -> Tensor:
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._sampled_rewards = rewards[:, 0]  # every process's responses, in order; sliced below
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        prompt_ids, completion_mask = out["prompt_ids"], out["completion_mask"]
        if not torch.equal(prompt_ids[0::2], prompt_ids[1::2]):  # TRL's sampler keeps a prompt's two together
            raise RuntimeError("online_psipo: the two responses of a pair do not share their prompt")
        local = completion_mask.size(0)
        start = self.accelerator.process_index * local
        rewards = _pairs(self._sampled_rewards[start : start + local])  # (P, 2)
        p_hat = torch.sigmoid(rewards[:, 0] - rewards[:, 1])  # eq. 4
        if self.rollout.label == "bernoulli":
            p_hat = torch.bernoulli(p_hat)
        ids = torch.cat([prompt_ids, out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], completion_mask], dim=1)
        mode = "train" if self.model.training else "eval"
        batch = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference(),
        ):  # in micro-batches, as RLOO's own passes over a batch of samples
            ref_tokens, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, completion_mask.size(1), batch_size=batch
            )
        ref = (ref_tokens * completion_mask).sum(1)
        # Σ_t log π/π_ref of each sample: its KL estimate (old_logps are the policy's log-probs at sampling time).
        # With an IPO-MD mixture the training samples come from π_β, so this (and the reward) describe them.
        kl = self.accelerator.gather(out["old_logps"] - ref)
        self._metrics[mode]["kl_sequence"].append(kl.mean().item())
        self._metrics[mode]["p_hat"].append(self.accelerator.gather(p_hat).mean().item())
        return {
            "prompt_ids": prompt_ids[0::2],
            "prompt_mask": out["prompt_mask"][0::2],
            "completion_ids": _pairs(out["completion_ids"]),
            "completion_mask": _pairs(completion_mask),
            "ref_logps": _pairs(ref),
            "p_hat": p_hat,
        }

    def _compute_loss(self, model: Any, inputs: dict[str, Tensor]) -> Tensor:
        completion_mask = inputs["completion_mask"].flatten(0, 1)  # (2P, Lc)
        ids = torch.cat([inputs["prompt_ids"].repeat_interleave(2, 0), inputs["completion_ids"].flatten(0, 1)], 1)
        mask = torch.cat([inputs["prompt_mask"].repeat_interleave(2, 0), completion_mask], dim=1)
        per_token, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, ids, mask, completion_mask.size(1), compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )
        lengths = completion_mask.sum(1)
        policy = _pairs(sequence_logps((per_token * completion_mask).sum(1), lengths, self.objective.logps))
        ref = _pairs(sequence_logps(inputs["ref_logps"].flatten(), lengths, self.objective.logps))
        h = margin(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1])
        objective = self.objective
        losses, target = pair_losses("psipo", h, objective.tau, inputs["p_hat"], objective.psi, objective.label_eps)
        loss = losses.mean()
        if self.aux_loss_enabled:  # MoE load balancing, as TRL adds it
            loss = loss + self.router_aux_loss_coef * aux_loss
        self._record(h, target, inputs["p_hat"], losses, entropies, completion_mask)
        return loss

    def _record(
        self, h: Tensor, target: Tensor, p_hat: Tensor, losses: Tensor, entropies: Tensor, completion_mask: Tensor
    ) -> None:
        """Per-pair metrics, each pair oriented so that its preferred sample comes first (p̂ ≥ ½): the margin and
        target then read as in a preference run (the loss is the same either way round for ΨPO's symmetric Ψ
        difference)."""
        mode = "train" if self.model.training else "eval"
        sign = torch.where(p_hat >= 0.5, 1.0, -1.0)
        values = {
            "margin": (h * sign).detach(),
            "target": (target * sign).detach(),
            "reward_accuracy": ((h * sign) > 0).float(),
            "entropy": (entropies * completion_mask).sum(1) / completion_mask.sum(1),
        }
        if mode == "eval":
            values["loss"] = losses.detach()
        for key, value in values.items():
            # gather_for_metrics trims the sampler's repeats counted in responses: two rows per pair.
            rows = value.detach().repeat_interleave(2) if key != "entropy" else value.detach()
            gathered = self.accelerator.gather_for_metrics(rows).float()
            self._metrics[mode][key].extend((gathered if key == "entropy" else gathered[0::2]).tolist())


def build_online_trainer(prepared: Prepared, model: Any = None) -> OnlinePsipoTrainer:
    """The online_psipo stage's trainer. β = 0: RLOO's own reference pass and KL reward are off; this trainer
    computes the reference log-probs itself."""
    recipe = prepared.recipe
    return build_sampling_trainer(
        OnlinePsipoTrainer, prepared, model, {"beta": 0.0}, objective=recipe.objective, rollout=recipe.rollout
    )
