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


def _pair_layout(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, Tensor]:
    """One pair as a single row `[prompt | chosen | p' | rejected]` (see PrefixSharedForward), unpadded."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    ids = torch.tensor(prompt + chosen + prompt[-1:] + rejected)  # (n,), n = p + c + 1 + r
    positions = torch.tensor([*range(p + c), p - 1, *range(p, p + r)])
    segment = torch.tensor([0] * p + [1] * c + [2] * (1 + r))  # 0 prompt, 1 chosen, 2 p' and rejected
    n = ids.numel()
    # Position t predicts the next token of its own branch: p−1 -> chosen[0], p' -> rejected[0].
    labels = torch.full((n,), -100)
    labels[p - 1 : p - 1 + c] = torch.tensor(chosen)  # positions p−1 … p+c−2
    labels[p + c : p + c + r] = torch.tensor(rejected)  # p' … the second-to-last rejected token
    chosen_mask = torch.zeros(n, dtype=torch.bool)
    chosen_mask[p - 1 : p + c - 1] = True
    rejected_mask = torch.zeros(n, dtype=torch.bool)
    rejected_mask[p + c : p + c + r] = True
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = (j <= i) & ((segment[j] == 0) | (segment[j] == segment[i]))
    seen &= ~((segment[i] == 2) & (j == p - 1))  # the rejected branch sees p' instead of the prompt's last token
    return {
        "ids": ids,
        "positions": positions,
        "labels": labels,
        "chosen": chosen_mask,
        "rejected": rejected_mask,
        "mask": seen,
        "prompt_length": torch.tensor(p),
    }


@dataclass
class PrefixSharedCollator:
    """Pairs as `[prompt | chosen | p' | rejected]` rows with a 4-D attention mask, right-padded.

    Truncation matches TRL's `keep_start` on each `[prompt | response]` sequence, so both layouts score the
    same tokens.
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._row(example) for example in examples]
        width = max(row["ids"].numel() for row in rows)
        batch: dict[str, Any] = {
            "input_ids": _stack(rows, "ids", width, self.pad_token_id),
            "position_ids": _stack(rows, "positions", width, 0),
            "shift_labels": _stack(rows, "labels", width, -100),
            "chosen_mask": _stack(rows, "chosen", width, False),
            "rejected_mask": _stack(rows, "rejected", width, False),
            "attention_mask": _stack_masks(rows, width),  # (B, 1, L, L) bool, True = may attend
            "prompt_lengths": torch.stack([row["prompt_length"] for row in rows]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps", "p_hat"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)
        return batch

    def _row(self, example: dict[str, Any]) -> dict[str, Tensor]:
        prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
        if self.max_length is not None:
            room = self.max_length - len(prompt)  # > 0: TRL drops pairs whose prompt fills max_length
            chosen, rejected = chosen[:room], rejected[:room]
        return _pair_layout(prompt, chosen, rejected)


def _stack(rows: list[dict[str, Tensor]], key: str, width: int, fill: Any) -> Tensor:
    out = torch.full((len(rows), width), fill, dtype=rows[0][key].dtype)
    for b, row in enumerate(rows):
        out[b, : row[key].numel()] = row[key]
    return out


def _stack_masks(rows: list[dict[str, Tensor]], width: int) -> Tensor:
    # Padding positions attend to themselves only, so no softmax row is empty (no NaN); nothing reads them.
    out = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    for b, row in enumerate(rows):
        n = row["ids"].numel()
        out[b, :n, :n] = row["mask"]
    return out[:, None]  # (B, 1, L, L)


class PrefixSharedForward:
    """Prompt computed once per pair: one row `[prompt | chosen | p' | rejected]` and one model call.

    The chosen branch sees the prompt and itself. The rejected branch starts with p', a copy of the prompt's last
    token at that token's position, which sees the prompt minus its last token and itself: its hidden states
    (and so its keys and values) equal the original's at every layer, so the rejected tokens attend to exactly
    the keys they would see in `[prompt | rejected]`, and p' predicts rejected[0] as the prompt's last token
    would. Position ids of the rejected branch continue from the prompt's end. The result equals the
    concatenated layout up to float summation order, for one extra token per pair instead of a second prompt.
    Needs an attention kernel that takes a 4-D mask (eager, sdpa, flex_attention), not flash_attention_2.
    """

    def collator(self, pad_token_id: int, max_length: int | None) -> PrefixSharedCollator:
        return PrefixSharedCollator(pad_token_id=pad_token_id, max_length=max_length)

    def __call__(self, model: Any, inputs: dict[str, Tensor]) -> PairLogps:
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=_attention_mask(model, inputs["attention_mask"]),
            position_ids=inputs["position_ids"],
            shift_labels=inputs["shift_labels"],  # already aligned: position t's own next token
            fused_lm_head=True,
            use_cache=False,
        )
        logps = out.log_probs  # (B, L), zero where the label is -100
        chosen_mask, rejected_mask = inputs["chosen_mask"], inputs["rejected_mask"]
        return PairLogps(
            (logps * chosen_mask).sum(dim=1),
            (logps * rejected_mask).sum(dim=1),
            chosen_mask.sum(dim=1),
            rejected_mask.sum(dim=1),
        )

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        return inputs["prompt_lengths"].sum() + inputs["chosen_mask"].sum() + inputs["rejected_mask"].sum()


def _attention_mask(model: Any, allowed: Tensor) -> Tensor:
    """SDPA and flex take the boolean mask; eager adds it to the scores, so it gets 0 / −inf (as float32)."""
    config = getattr(model, "config", None) or model.module.config
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
    return allowed
