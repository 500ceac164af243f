"""Lean prefix sharing: the prompt runs once, then both responses attend to its keys and values as two short rows.

The dense shared row `[prompt | chosen | p' | rejected]` (forward.py) computes attention over the whole L×L square
and masks most of it away: the chosen×rejected block and the upper triangle are computed for nothing. Here the
prompt minus its last token runs first and leaves its keys and values in a cache; the cache is repeated for the two
responses of each pair, and the rows `[p_last | chosen]` and `[p_last | rejected]` run against it. Gradients reach
the prompt through the cached keys and values. Every row scores exactly what TRL's `[prompt | response]` rows score:
same tokens, same positions, same attention.

Prompts are left-padded so the cache ends where every response starts: distances in the cache are then true
distances, which is what sliding windows are measured on. transformers drops a cache under gradient checkpointing,
so a checkpointed model keeps the dense row, as does a DeepSpeed engine (`PrefixSharedForward` decides).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def lean_inputs(pairs: list[tuple[list[int], list[int], list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """The batch's (prompt, chosen, rejected) token lists (already truncated) as lean rows.

    `lean_prompt_*`: (B, P) prompts without their last token, left-padded (pad positions 1, as in generation).
    `lean_*`: (2B, R) rows `[p_last | response]`, a pair's chosen row then its rejected row, right-padded; positions
    continue from the prompt; `lean_labels` holds each position's next token of its own row (-100 elsewhere)."""
    width = max(len(prompt) for prompt, _, _ in pairs) - 1
    batch = len(pairs)
    prompt_ids = torch.full((batch, width), pad_token_id)
    prompt_mask = torch.zeros((batch, width), dtype=torch.long)
    prompt_positions = torch.ones((batch, width), dtype=torch.long)
    rows, starts = [], []
    for b, (prompt, chosen, rejected) in enumerate(pairs):
        n = len(prompt) - 1
        if n:
            prompt_ids[b, width - n :] = torch.tensor(prompt[:-1])
            prompt_mask[b, width - n :] = 1
            prompt_positions[b, width - n :] = torch.arange(n)
        rows += [[prompt[-1], *chosen], [prompt[-1], *rejected]]
        starts += [n, n]
    row_width = max(len(row) for row in rows)
    ids = torch.full((len(rows), row_width), pad_token_id)
    mask = torch.zeros((len(rows), row_width), dtype=torch.long)
    labels = torch.full((len(rows), row_width), -100)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        labels[r, : len(row) - 1] = torch.tensor(row[1:])
    positions = torch.tensor(starts).unsqueeze(1) + torch.arange(row_width)
    return {
        "lean_prompt_ids": prompt_ids,
        "lean_prompt_mask": prompt_mask,
        "lean_prompt_positions": prompt_positions,
        "lean_ids": ids,
        "lean_mask": mask,
        "lean_positions": positions,
        "lean_labels": labels,
    }


def lean_logps(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(chosen, rejected) summed log-probs and token counts, (B,) each, from the lean rows: two model calls."""
    prompt_ids, mask, cache = inputs["lean_prompt_ids"], inputs["lean_mask"], None
    if prompt_ids.size(1):  # some prompt has more than one token: its keys and values go first
        prompt_mask = inputs["lean_prompt_mask"]
        out = _inside_data_parallel(model)(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=inputs["lean_prompt_positions"],
            use_cache=True,
            logits_to_keep=1,  # only the cache is wanted; p_last is scored in the response rows
        )
        cache = out.cache
        if cache is None or cache.get_seq_length() != prompt_ids.size(1):
            raise RuntimeError("the model returned no cache for the prompt")  # caught by the self-check: dense row
        cache.batch_repeat_interleave(2)  # a pair's chosen and rejected rows share its prompt
        mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), mask], dim=1)
    labels = inputs["lean_labels"]
    out = model(
        input_ids=inputs["lean_ids"],
        attention_mask=mask,
        position_ids=inputs["lean_positions"],
        cache=cache,
        shift_labels=labels,  # already aligned: position t's own next token
        fused_lm_head=True,
        use_cache=False,
    )
    sums, tokens = out.log_probs.sum(dim=1), (labels != -100).sum(dim=1)  # (2B,)
    return sums[0::2], sums[1::2], tokens[0::2], tokens[1::2]


def inside_deepspeed(model: Any) -> bool:
    """Whether `model` is a DeepSpeed engine: there the dense row is used (see `PrefixSharedForward`)."""
    return type(model).__name__ == "DeepSpeedEngine"


def _inside_data_parallel(model: Any) -> Any:
    """The module inside a DDP wrapper, for the prompt pass: each call of the wrapper sets up the step's gradient
    reduction, and the response pass's graph already reaches the prompt's parameters through the cache (DDP
    refuses a second call before backward)."""
    while type(model).__name__ == "DistributedDataParallel":
        model = model.module
    return model


def checkpointing(model: Any) -> bool:
    """Whether any module of `model` (inside PEFT, DeepSpeed or DDP wrappers) has gradient checkpointing on."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
