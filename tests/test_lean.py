"""The lean form of prefix sharing: its rows, and when it is taken (the conformance matrix checks its numbers)."""

from __future__ import annotations

import pytest
import torch

from psipo_cli.training import forward as forward_module
from psipo_cli.training.forward import PrefixSharedForward
from psipo_cli.training.lean import checkpointing, lean_inputs
from tests.conftest import TINY_MODEL


def test_lean_rows_left_pad_prompts_and_continue_their_positions() -> None:
    rows = lean_inputs([([5, 6, 7], [8, 9], [10, 11, 12]), ([5, 6], [8], [10])], pad_token_id=0)
    # Prompts without their last token, left-padded, so every response row starts where the cache ends.
    assert rows["lean_prompt_ids"].tolist() == [[5, 6], [0, 5]]
    assert rows["lean_prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert rows["lean_prompt_positions"].tolist() == [[0, 1], [1, 0]]
    # [p_last | response] rows: chosen then rejected per pair, right-padded.
    assert rows["lean_ids"].tolist() == [[7, 8, 9, 0], [7, 10, 11, 12], [6, 8, 0, 0], [6, 10, 0, 0]]
    assert rows["lean_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert rows["lean_positions"].tolist() == [[2, 3, 4, 5], [2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 3, 4]]
    # Each position predicts the next token of its own row: exactly the response tokens are scored.
    assert rows["lean_labels"].tolist() == [
        [8, 9, -100, -100],
        [10, 11, 12, -100],
        [8, -100, -100, -100],
        [10, -100, -100, -100],
    ]


def test_packed_batches_carry_no_lean_rows() -> None:
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [10]}] * 2
    assert "lean_ids" in PrefixSharedForward().collator(0, None)(examples)
    assert not any(key.startswith("lean_") for key in PrefixSharedForward(64).collator(0, None)(examples))


@pytest.mark.parametrize(("prompt", "responses", "lean"), [(30, (3, 3), True), (5, (1, 40), False)])
def test_lean_rows_run_unless_the_dense_row_is_cheaper(prompt: int, responses: tuple, lean: bool, monkeypatch) -> None:
    """Equal response lengths: the same tokens and fewer attention scores, lean. Very unequal ones: the lean rows
    pad every response to the longest, dense."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    add_fused_lm_head(model)
    taken = []
    original = forward_module.lean_logps
    monkeypatch.setattr(forward_module, "lean_logps", lambda *a: taken.append(1) or original(*a))
    step = PrefixSharedForward()
    examples = [
        {"prompt_ids": [5] * prompt, "chosen_ids": [8] * 3, "rejected_ids": [10] * 3},
        {"prompt_ids": [6] * prompt, "chosen_ids": [8] * responses[0], "rejected_ids": [10] * responses[1]},
    ]
    with torch.no_grad():
        step(model, step.collator(0, None)(examples))
    assert bool(taken) is lean


@pytest.mark.parametrize("checkpointed", [False, True])
def test_checkpointed_models_take_the_dense_row(checkpointed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers drops the cache under gradient checkpointing, so the lean form must not run there."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    add_fused_lm_head(model)  # as TRL's trainer does
    if checkpointed:
        model.gradient_checkpointing_enable()
    assert checkpointing(model) is checkpointed
    taken = []
    original = forward_module.lean_logps
    monkeypatch.setattr(forward_module, "lean_logps", lambda *a: taken.append(1) or original(*a))
    step = PrefixSharedForward()
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11]}]
    with torch.no_grad():
        step(model, step.collator(0, None)(examples))
    assert bool(taken) is not checkpointed
