"""Forward steps: how a batch of pairs becomes per-sequence response log-probs.

A forward step owns both the batch layout (its collator) and the model call that reads it, so the
trainer can swap layouts (e.g. a prefix-shared `[prompt | chosen | rejected]` row) without touching the
loss. Every step returns summed log-probs and response lengths; aggregation (sum or mean) happens in
`objectives.sequence_logps`, the same for policy and reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from trl.trainer.dpo_trainer import DataCollatorForPreference


@dataclass
class PairLogps:
    """Summed response log-probs and response token counts of a batch of B pairs."""

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,)
    rejected_tokens: Tensor  # (B,)


class ForwardStep(Protocol):
    def collator(self, pad_token_id: int, max_length: int | None) -> Any:
        """The collator producing the batches this step reads."""

    def __call__(self, model: Any, inputs: dict[str, Tensor]) -> PairLogps:
        """Per-sequence log-probs of chosen and rejected under `model` (policy or reference)."""

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        """Real tokens of the batch, prompt counted once: prompt + chosen + rejected, padding excluded."""


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, also passing the soft label p̂ when the data has one."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "p_hat" in examples[0]:
            batch["p_hat"] = torch.tensor([example["p_hat"] for example in examples], dtype=torch.float32)
        return batch


class ConcatenatedForward:
    """TRL's layout: 2B padded rows, chosen rows first, each `[prompt | response]`; one model call."""

    def collator(self, pad_token_id: int, max_length: int | None) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=pad_token_id, max_length=max_length, truncation_mode="keep_start")

    def __call__(self, model: Any, inputs: dict[str, Tensor]) -> PairLogps:
        completion_mask = inputs["completion_mask"]  # (2B, L)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # TRL's fused LM head scores only labelled positions, in chunks, never materialising (2B, L, V) logits.
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        shift_mask = completion_mask[:, 1:]  # (2B, L-1): position t predicts token t+1
        logps = out.log_probs[:, -shift_mask.size(1) :].sum(dim=1)  # (2B,)
        tokens = shift_mask.sum(dim=1)  # (2B,)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        attention_chosen, _ = inputs["attention_mask"].chunk(2)  # prompt + chosen
        _, completion_rejected = inputs["completion_mask"].chunk(2)  # rejected only
        return attention_chosen.sum() + completion_rejected.sum()
