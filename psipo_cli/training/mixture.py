"""Sampling from the geometric mixture π^(1−β)·π_ref^β (IPO-MD, Calandriello et al. 2024) with one set of weights.

Per token, the mixture's next-token distribution is softmax((1−β)·log π(·|x, y_<t) + β·log π_ref(·|x, y_<t)), as
in Nash-MD (Munos et al. 2023). `MixtureLogits` is a transformers logits processor: `generate` runs the policy,
and the processor runs the same model with the adapter off (π_ref) on the tokens generated so far, keeping its
own key/value cache, and returns the mixed log-probabilities. transformers applies the temperature and top-p
warpers after custom processors, so rollout.temperature/top_p act on the mixture as they act on π.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList
from trl.models import unwrap_model_for_generation

from psipo_cli.data.chat import up_to_stop
from psipo_cli.models.loading import use_adapter


class MixtureLogits(LogitsProcessor):
    """Next-token log-probs of π^(1−β)·π_ref^β (normalised) for a left-padded batch being generated."""

    def __init__(
        self, model: Any, reference: Callable[[], AbstractContextManager], prompt_mask: Tensor, beta: float
    ) -> None:
        self.model, self.reference, self.prompt_mask, self.beta = model, reference, prompt_mask, beta
        self.cache: Any = None
        self.seen = 0  # tokens of each row already in the reference's cache

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        grown = input_ids.size(1) - self.prompt_mask.size(1)
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.size(0), grown)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        with self.reference():
            out = self.model(
                input_ids=input_ids[:, self.seen :],
                attention_mask=mask,
                position_ids=positions[:, self.seen :],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,  # only the next token's: not (B, prompt length, vocabulary) on the first call
            )
        self.cache, self.seen = out.cache, input_ids.size(1)
        reference = out.logits[:, -1].float().log_softmax(-1)
        return (1 - self.beta) * scores.float().log_softmax(-1) + self.beta * reference


class MixtureSampling:
    """Mixin for TRL's RLOOTrainer: with `self.rollout.mixture` = β > 0, responses are sampled from the mixture."""

    rollout: Any
    accelerator: Any
    model: Any
    model_wrapped: Any
    args: Any
    generation_config: Any
    generation_kwargs: Any
    eos_token_ids: list[int]
    _tokenizer: Any

    def _generate_single_turn(self, prompt_ids: list[list[int]], images: Any, multimodal_fields: dict) -> Any:
        # Evaluation samples π itself: its reward and KL are the policy's, not the mixture's.
        if not self.rollout.mixture or not self.model.training:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)  # type: ignore[misc]
        device = self.accelerator.device
        rows = [torch.tensor(ids) for ids in prompt_ids]
        pad = self._tokenizer.pad_token_id
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, True, pad, padding_side="left").to(device)
        ones = [torch.ones_like(r) for r in rows]
        prompt_mask = torch.nn.utils.rnn.pad_sequence(ones, True, 0, padding_side="left").to(device)
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            ref_name = "ref" if "ref" in model.peft_config else None
            mixture = MixtureLogits(model, lambda: use_adapter(model, ref_name), prompt_mask, self.rollout.mixture)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=prompt_mask,
                generation_config=self.generation_config,
                logits_processor=LogitsProcessorList([mixture]),
            )
        return [up_to_stop(row.tolist(), self.eos_token_ids) for row in out[:, input_ids.size(1) :].cpu()]
