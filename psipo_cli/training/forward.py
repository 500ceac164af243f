"""Forward steps: how a batch of pairs becomes per-sequence response log-probs.

A forward step owns both the batch layout (its collator) and the model call that reads it, so the
trainer can swap layouts (e.g. a prefix-shared `[prompt | chosen | rejected]` row) without touching the
loss. Every step returns summed log-probs and response lengths; aggregation (sum or mean) happens in
`aggregate` (through `objectives.sequence_logps`), the same for policy and reference, trainer and `psipo eval`.
`layout_check.CheckedForward` guards the prefix-shared layout with a comparison against the concatenated one on
the user's own model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from trl.trainer.dpo_trainer import DataCollatorForPreference

from psipo_cli.models.masks import UnsupportedLayout, attention_masks, model_config
from psipo_cli.objectives import sequence_logps
from psipo_cli.training.lean import checkpointing, inside_deepspeed, lean_inputs, lean_logps

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1  # `branch` of a token in a shared row
# `visible`: the branches that may attend to a token, one bit per branch (see masks.py).
SEEN_BY_ALL, SEEN_BY_PROMPT_AND_CHOSEN = 0b111, 0b011


@dataclass
class PairLogps:
    """Summed response log-probs and response token counts of a batch of B pairs."""

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,)
    rejected_tokens: Tensor  # (B,)
    router_aux_loss: Tensor | None = None  # () MoE load balancing, already times router_aux_loss_coef


def aggregate(policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor, how: str) -> tuple[Tensor, ...]:
    """(π_c, π_r, ref_c, ref_r) per sequence, as sum or token mean (`objectives.sequence_logps`) over the policy's
    response tokens, in fp32 so the squared losses keep their precision. The trainer and `psipo eval` both use it."""
    n_c, n_r = policy.chosen_tokens, policy.rejected_tokens
    return (
        sequence_logps(policy.chosen.float(), n_c, how),
        sequence_logps(policy.rejected.float(), n_r, how),
        sequence_logps(ref_chosen.float().to(n_c.device), n_c, how),
        sequence_logps(ref_rejected.float().to(n_r.device), n_r, how),
    )


class ForwardStep(Protocol):
    def collator(self, pad_token_id: int, max_length: int | None) -> Any:
        """The collator producing the batches this step reads."""

    def __call__(self, model: Any, inputs: dict[str, Tensor], router_aux: bool = False) -> PairLogps:
        """Per-sequence log-probs of chosen and rejected under `model` (policy or reference); with `router_aux`, an
        MoE model's load-balancing loss too (the policy pass only, as TRL does)."""

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        """Real tokens of the batch, prompt counted once: prompt + chosen + rejected, padding excluded."""


def router_aux_coef(model: Any) -> float:
    """The MoE load-balancing coefficient TRL's DPOTrainer applies (0.0 for dense models)."""
    text = model_config(model).get_text_config()
    return getattr(text, "router_aux_loss_coef", 0.0) if hasattr(text, "output_router_logits") else 0.0


def _router_kwargs(coef: float, router_aux: bool) -> dict[str, Any]:
    # Explicit either way: the fused head turns router logits on whenever the config says so.
    return {"output_router_logits": router_aux} if coef else {}


PER_PAIR_FLOATS = ("ref_chosen_logps", "ref_rejected_logps", "p_hat")  # optional columns, one number per pair


def per_pair_floats(examples: list[dict[str, Any]], keys: tuple[str, ...] = PER_PAIR_FLOATS) -> dict[str, Tensor]:
    """The optional per-pair numbers the data has (soft label p̂, precomputed reference log-probs), as (B,) floats.

    Every collator (both layouts here, the reward model's) passes them through the same way."""
    return {
        key: torch.tensor([example[key] for example in examples], dtype=torch.float32)
        for key in keys
        if key in examples[0]
    }


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator (which passes the reference log-probs itself), also passing the soft label p̂."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {**super().torch_call(examples), **per_pair_floats(examples, ("p_hat",))}


class ConcatenatedForward:
    """TRL's layout: 2B padded rows, chosen rows first, each `[prompt | response]`; one model call."""

    def collator(self, pad_token_id: int, max_length: int | None) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=pad_token_id, max_length=max_length, truncation_mode="keep_start")

    def __call__(self, model: Any, inputs: dict[str, Tensor], router_aux: bool = False) -> PairLogps:
        completion_mask = inputs["completion_mask"]  # (2B, L)
        coef = router_aux_coef(model)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # TRL's fused LM head scores only labelled positions, in chunks, never materialising (2B, L, V) logits.
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
            **_router_kwargs(coef, router_aux),
        )
        shift_mask = completion_mask[:, 1:]  # (2B, L-1): position t predicts token t+1
        logps = out.log_probs[:, -shift_mask.size(1) :].sum(dim=1)  # (2B,)
        tokens = shift_mask.sum(dim=1)  # (2B,)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        aux = out.aux_loss * coef if router_aux and out.aux_loss is not None else None
        return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, aux)

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        attention_chosen, _ = inputs["attention_mask"].chunk(2)  # prompt + chosen
        _, completion_rejected = inputs["completion_mask"].chunk(2)  # rejected only
        return attention_chosen.sum() + completion_rejected.sum()


def _pair_layout(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, Tensor]:
    """One pair as a single row `[prompt | chosen | p' | rejected]` (see PrefixSharedForward), unpadded."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    n = p + c + 1 + r
    labels = torch.full((n,), -100)
    # Position t predicts the next token of its own branch: p−1 -> chosen[0], p' -> rejected[0].
    labels[p - 1 : p - 1 + c] = torch.tensor(chosen)  # positions p−1 … p+c−2
    labels[p + c : p + c + r] = torch.tensor(rejected)  # p' … the second-to-last rejected token
    chosen_mask = torch.zeros(n, dtype=torch.bool)
    chosen_mask[p - 1 : p + c - 1] = True
    rejected_mask = torch.zeros(n, dtype=torch.bool)
    rejected_mask[p + c : p + c + r] = True
    visible = [SEEN_BY_ALL] * (p - 1) + [SEEN_BY_PROMPT_AND_CHOSEN] + [1 << CHOSEN] * c + [1 << REJECTED] * (1 + r)
    return {
        "ids": torch.tensor(prompt + chosen + prompt[-1:] + rejected),
        "positions": torch.tensor([*range(p + c), p - 1, *range(p, p + r)]),
        "branch": torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * (1 + r), dtype=torch.int8),
        "visible": torch.tensor(visible, dtype=torch.int8),
        "labels": labels,
        "chosen": chosen_mask,
        "rejected": rejected_mask,
    }


@dataclass
class PrefixSharedCollator:
    """Pairs as `[prompt | chosen | p' | rejected]` segments described per token (masks.py builds the attention mask
    on the model's device), right-padded rows.

    `row_tokens` None: one pair per row. A number: pairs are packed, in order, into rows of at most that many
    tokens (a longer pair gets a row of its own), with no attention between them and positions restarting at each
    pair, so a batch of pairs of unequal lengths carries little padding. Per-token `pair` (the pair's index in the
    batch) and `segment` (its slot in the row) let the forward step sum each pair's log-probs and masks.py keep the
    pairs apart. Truncation matches TRL's `keep_start` on each `[prompt | response]` sequence, so every layout scores
    the same tokens.
    """

    pad_token_id: int
    max_length: int | None = None
    row_tokens: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [self._truncated(example) for example in examples]
        rows = self._pack([_pair_layout(*pair) for pair in pairs])
        width = max(row["ids"].numel() for row in rows)
        batch: dict[str, Any] = {
            "input_ids": _stack(rows, "ids", width, self.pad_token_id),
            "position_ids": _stack(rows, "positions", width, 0),
            "branch": _stack(rows, "branch", width, PADDING),
            "visible": _stack(rows, "visible", width, 0),
            "segment": _stack(rows, "segment", width, -1),
            "pair": _stack(rows, "pair", width, -1),
            "shift_labels": _stack(rows, "labels", width, -100),
            "chosen_mask": _stack(rows, "chosen", width, False),
            "rejected_mask": _stack(rows, "rejected", width, False),
            "prompt_lengths": torch.tensor([len(example["prompt_ids"]) for example in examples]),
        }
        lean = lean_inputs(pairs, self.pad_token_id) if self.row_tokens is None else {}  # packed rows stay dense
        return {**batch, **lean, **per_pair_floats(examples)}

    def _truncated(self, example: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
        prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
        if self.max_length is not None:
            room = self.max_length - len(prompt)  # > 0: TRL drops pairs whose prompt fills max_length
            chosen, rejected = chosen[:room], rejected[:room]
        return prompt, chosen, rejected

    def _pack(self, pairs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Consecutive pairs into rows (next fit: a pair that does not fit the open row starts the next one), so a
        row's pairs are adjacent in the batch."""
        groups: list[list[int]] = []
        used = 0
        for index, pair in enumerate(pairs):
            size = pair["ids"].numel()
            if not groups or self.row_tokens is None or used + size > self.row_tokens:
                groups.append([])
                used = 0
            groups[-1].append(index)
            used += size
        rows = []
        for group in groups:
            row = {key: torch.cat([pairs[i][key] for i in group]) for key in pairs[group[0]]}
            sizes = [pairs[i]["ids"].numel() for i in group]
            row["segment"] = torch.repeat_interleave(torch.arange(len(group), dtype=torch.int16), torch.tensor(sizes))
            row["pair"] = torch.repeat_interleave(torch.tensor(group), torch.tensor(sizes))
            rows.append(row)
        return rows


def _stack(rows: list[dict[str, Tensor]], key: str, width: int, fill: Any) -> Tensor:
    out = torch.full((len(rows), width), fill, dtype=rows[0][key].dtype)
    for b, row in enumerate(rows):
        out[b, : row[key].numel()] = row[key]
    return out


class PrefixSharedForward:
    """Prompt computed once per pair: one row `[prompt | chosen | p' | rejected]` and one model call.

    The chosen branch sees the prompt and itself. The rejected branch starts with p', a copy of the prompt's last
    token at that token's position, which sees the prompt minus its last token and itself: its hidden states
    (and so its keys and values) equal the original's at every layer, so the rejected tokens attend to exactly
    the keys they would see in `[prompt | rejected]`, and p' predicts rejected[0] as the prompt's last token
    would. Position ids of the rejected branch continue from the prompt's end, and sliding windows are measured on
    them. The result equals the concatenated layout up to float summation order, for one extra token per pair
    instead of a second prompt. Raises `UnsupportedLayout` where that cannot hold.

    Unpacked batches on a model without gradient checkpointing take the lean form instead (lean.py): the prompt
    runs once and both responses attend to its cached keys and values, so no masked-out attention is computed.
    The collator builds both forms; packed rows and checkpointed models use the dense row.
    """

    def __init__(self, row_tokens: int | None = None) -> None:
        self.row_tokens = row_tokens  # pack pairs into rows of this many tokens (None: a row per pair)

    def collator(self, pad_token_id: int, max_length: int | None) -> PrefixSharedCollator:
        return PrefixSharedCollator(pad_token_id=pad_token_id, max_length=max_length, row_tokens=self.row_tokens)

    def __call__(
        self, model: Any, inputs: dict[str, Tensor], router_aux: bool = False, form: str = "auto"
    ) -> PairLogps:
        """`form`: "lean", "dense", or "auto": lean unless the model is checkpointed, runs in a DeepSpeed engine
        (whose ZeRO gradients through the lean form's two calls did not match one process: tests/test_distributed.py),
        or the batch's lean rows cost more than its dense ones (`_lean_pays`). The self-check runs each form by name."""
        coef = router_aux_coef(model)
        if router_aux and coef:
            # transformers' load-balancing loss reads a (B, L) padding mask; a shared row has a 4-D one.
            raise UnsupportedLayout("the MoE router balancing loss needs the concatenated layout")
        if form == "lean" or (form == "auto" and self._lean_pays(model, inputs)):
            return PairLogps(*lean_logps(model, inputs))
        descriptors = (inputs["branch"], inputs["visible"], inputs["position_ids"], inputs["segment"])
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=attention_masks(model, *descriptors),
            position_ids=inputs["position_ids"],
            shift_labels=inputs["shift_labels"],  # already aligned: position t's own next token
            fused_lm_head=True,
            use_cache=False,
            **_router_kwargs(coef, False),
        )
        logps = out.log_probs  # (R, L), zero where the label is -100
        pairs, pair = inputs["prompt_lengths"].numel(), inputs["pair"]

        def per_pair(mask: Tensor, values: Tensor) -> Tensor:  # (R, L) -> (pairs,): sum over each pair's tokens
            # Tokens outside the mask go to an extra slot that is dropped: no boolean indexing, so no device sync.
            index = torch.where(mask, pair, pairs).flatten()
            return values.new_zeros(pairs + 1).index_add(0, index, (values * mask).flatten())[:pairs]

        chosen_mask, rejected_mask = inputs["chosen_mask"], inputs["rejected_mask"]
        return PairLogps(
            per_pair(chosen_mask, logps),
            per_pair(rejected_mask, logps),
            per_pair(chosen_mask, chosen_mask.long()),
            per_pair(rejected_mask, rejected_mask.long()),
        )

    @staticmethod
    def _lean_pays(model: Any, inputs: dict[str, Tensor]) -> bool:
        """Whether the lean rows cost no more than the dense ones: tokens (padding included) plus attention scores
        computed, at a score's share of a token's FLOPs. Shapes only, known on the host: no device sync."""
        if "lean_ids" not in inputs or checkpointing(model) or inside_deepspeed(model):
            return False
        text = model_config(model).get_text_config()
        # Per layer: a token's matmuls ≈ 2(4d² + 3d·ff) FLOPs, an attention score's 4d (QKᵀ and PV).
        scores_per_token = 2 * text.hidden_size + 1.5 * getattr(text, "intermediate_size", 4 * text.hidden_size)
        rows, width = inputs["input_ids"].shape
        batch, prompt = inputs["lean_prompt_ids"].shape
        response = inputs["lean_ids"].size(1)
        dense = rows * width + rows * width**2 / scores_per_token  # the mask computes the whole square
        lean = (
            batch * (prompt + 2 * response)
            + batch * (prompt**2 + 2 * response * (prompt + response)) / scores_per_token
        )
        return lean <= dense

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        return inputs["prompt_lengths"].sum() + inputs["chosen_mask"].sum() + inputs["rejected_mask"].sum()


def concatenated_from_shared(inputs: dict[str, Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """The same pairs in the concatenated layout (what `ConcatenatedForward` reads), built from a shared batch.

    The shared collator already truncated as TRL does, so both layouts hold the same tokens; this is how the
    self-check compares them and how a run falls back without changing its collator or data loader.
    """
    device = inputs["input_ids"].device
    # One copy to the host and one pass per pair: indexing on the device would wait for it at every pair.
    ids, branch, pair = (inputs[key].cpu() for key in ("input_ids", "branch", "pair"))
    chosen_rows, rejected_rows = [], []
    for index in range(inputs["prompt_lengths"].numel()):
        own = pair == index  # the pair's tokens, in order, wherever its row is
        tokens, kinds = ids[own], branch[own]
        prompt = tokens[kinds == PROMPT]
        chosen_rows.append((prompt, tokens[kinds == CHOSEN]))
        rejected_rows.append((prompt, tokens[kinds == REJECTED][1:]))  # drop p'
    sequences, completions = [], []
    for prompt, response in chosen_rows + rejected_rows:
        sequences.append(torch.cat([prompt, response]))
        completions.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(response)]))
    width = max(s.numel() for s in sequences)
    out = {
        "input_ids": ids.new_full((len(sequences), width), pad_token_id),
        "attention_mask": ids.new_zeros((len(sequences), width)),
        "completion_mask": ids.new_zeros((len(sequences), width)),
    }
    for row, (sequence, completion) in enumerate(zip(sequences, completions, strict=True)):
        out["input_ids"][row, : sequence.numel()] = sequence
        out["attention_mask"][row, : sequence.numel()] = 1
        out["completion_mask"][row, : sequence.numel()] = completion
    return {key: value.to(device) for key, value in out.items()}
