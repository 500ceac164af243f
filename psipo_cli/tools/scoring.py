"""Policy and reference log-probs of a finished run, through the trainer's own forward step, and the objective on them.

`score_pairs` gives each preference pair's margin, loss and target exactly as the trainer's evaluation computes
them (a sampling stage evaluates fresh samples instead: its pairs get online ΨPO's loss, or no loss for rlhf);
`score_responses` gives the summed log-probs of sampled responses (for `sampling`). Both run the model in the
recipe's mixed precision, as it trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from psipo_cli.models.loading import ReferenceContext
from psipo_cli.objectives import margin, pair_losses
from psipo_cli.recipe.schema import Recipe
from psipo_cli.training.forward import ConcatenatedForward, aggregate
from psipo_cli.training.layout_check import forward_step_for


@dataclass
class PairScores:
    """Per-pair results, aggregated as `objective.logps` says (sum or token mean), all (n,)."""

    margin: Tensor
    loss: Tensor | None  # None for rlhf: eq. 6 has no per-pair loss
    target: Tensor | None
    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    p_hat: Tensor | None


# The `objectives` loss a run's pairs are scored with, where it is not the run's own objective.loss: online ΨPO
# trains the psipo loss on pairs it samples, so fixed pairs get the same function; rlhf's eq. 6 has no pair loss.
PAIR_OBJECTIVE: dict[str, str | None] = {"online_psipo": "psipo", "rlhf": None}


def pair_objective(loss: str) -> str | None:
    return PAIR_OBJECTIVE.get(loss, loss)


def aggregation(recipe: Recipe) -> str:
    """How a sequence's token log-probs are aggregated: the recipe's, else the sum (rlhf's whole-sequence KL)."""
    return recipe.objective.logps or "sum"


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def trained_precision(model: Any, recipe: Recipe) -> contextlib.AbstractContextManager:
    """The trainer's mixed precision: bf16/fp16 autocast when the recipe trained with it."""
    dtype = torch.bfloat16 if recipe.training.bf16 else torch.float16 if recipe.training.fp16 else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _batches(dataset: Any, size: int) -> Iterator[list[dict[str, Any]]]:
    """In order, as the trainer's evaluation loop reads them (no shuffling, last batch short)."""
    for start in range(0, len(dataset), size):
        yield [dataset[i] for i in range(start, min(start + size, len(dataset)))]


@torch.no_grad()
def score_pairs(model: Any, reference: ReferenceContext, dataset: Any, recipe: Recipe, pad_token_id: int) -> PairScores:
    """Policy and reference log-probs of every pair through the trainer's forward step, then the objective."""
    forward = forward_step_for(recipe.training.prefix_sharing, pad_token_id, recipe.training.pack_tokens)
    collate = forward.collator(pad_token_id, recipe.data.max_length)
    how = aggregation(recipe)
    parts: dict[str, list[Tensor]] = {}
    for examples in _batches(dataset, recipe.training.per_device_eval_batch_size):
        inputs = to_device(
            collate([{k: v for k, v in e.items() if k != "prompt"} for e in examples]), model_device(model)
        )
        with trained_precision(model, recipe):
            policy = forward(model, inputs)
            with reference():
                ref = forward(model, inputs)
        logps = aggregate(policy, ref.chosen, ref.rejected, how)  # the trainer's own aggregation
        names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
        values = dict(zip(names, logps, strict=True))
        values |= {"chosen_tokens": policy.chosen_tokens, "rejected_tokens": policy.rejected_tokens}
        if "p_hat" in inputs:
            values["p_hat"] = inputs["p_hat"]
        for key, value in values.items():
            parts.setdefault(key, []).append(value.detach().cpu())
    return _objective(recipe, {key: torch.cat(value) for key, value in parts.items()})


def _objective(recipe: Recipe, logps: dict[str, Tensor]) -> PairScores:
    """Margins, losses and targets from `objectives`, the functions the trainer's loss step calls."""
    objective = recipe.objective
    h = margin(logps["policy_chosen"], logps["policy_rejected"], logps["ref_chosen"], logps["ref_rejected"])
    p_hat = logps.get("p_hat")
    losses, target = None, None
    if (name := pair_objective(objective.loss)) is not None:
        losses, target = pair_losses(name, h, objective.tau, p_hat, objective.psi, objective.label_eps)
    return PairScores(
        margin=h,
        loss=losses,
        target=target,
        policy_chosen=logps["policy_chosen"],
        policy_rejected=logps["policy_rejected"],
        ref_chosen=logps["ref_chosen"],
        ref_rejected=logps["ref_rejected"],
        chosen_tokens=logps["chosen_tokens"],
        rejected_tokens=logps["rejected_tokens"],
        p_hat=p_hat,
    )


def score_responses(
    model: Any,
    reference: ReferenceContext,
    prompt: list[int],
    responses: list[list[int]],
    recipe: Recipe,
    pad_token_id: int,
) -> tuple[Tensor, Tensor]:
    """Summed log π(y|x) and log π_ref(y|x) of each response, through the trainer's concatenated forward step."""
    forward = ConcatenatedForward()
    examples = [{"prompt_ids": prompt, "chosen_ids": r, "rejected_ids": r} for r in responses]
    collate = forward.collator(pad_token_id, None)  # no truncation: every token
    inputs = to_device(collate(examples), model_device(model))
    with trained_precision(model, recipe):
        policy = forward(model, inputs).chosen.float()
        with reference():
            ref = forward(model, inputs).chosen.float()
    return policy.cpu(), ref.cpu()
