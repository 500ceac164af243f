"""The prefix-shared layout's masks, the kernel lookup through wrappers, and the start-up self-check that falls
back (or stops) when the shared layout is not exact on the user's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from psipo_cli.models import masks
from psipo_cli.models.masks import UnsupportedLayout, allowed, attention_kernel, mask_mod
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.run.directory import read_metrics
from psipo_cli.training.finetune import build_trainer, prepare, run
from psipo_cli.training.forward import PrefixSharedForward
from psipo_cli.training.layout_check import CheckedForward
from tests.conftest import assert_clean_error


def _shared_batch() -> dict[str, torch.Tensor]:
    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]},
        {"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [10]},
    ]
    return PrefixSharedForward().collator(0, None)(examples)


def _allowed(batch: dict[str, torch.Tensor], window: int | None) -> torch.Tensor:
    return allowed(batch["branch"], batch["visible"], batch["position_ids"], window, batch["segment"])


def test_the_shared_mask_is_the_two_sequences_attention_written_out() -> None:
    batch = _shared_batch()
    mask = _allowed(batch, None)[0, 0]
    # Row [p0 p1 p2 | c0 c1 | p2' r0 r1 r2]: indices 0-2 prompt, 3-4 chosen, 5 p', 6-8 rejected.
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for i in range(3):
        expected[i, : i + 1] = True  # the prompt is causal
    for i in (3, 4):
        expected[i, : i + 1] = True  # chosen sees the prompt and itself
    for i in range(5, 9):
        expected[i, :2] = True  # the rejected branch sees the prompt but its last token ...
        expected[i, 5 : i + 1] = True  # ... which p' replaces, and itself; never the chosen tokens
    assert torch.equal(mask, expected)
    padded = _allowed(batch, None)[1, 0]
    assert padded[5:, :].sum() == 4 and all(padded[i, i] for i in range(5, 9))  # padding sees itself only


def test_packed_pairs_never_see_each_other() -> None:
    """Both pairs of `_shared_batch` packed into one row: each pair's block is its own shared mask, nothing between
    them, positions restart at the second pair, and the rule of flex is the same."""
    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]},
        {"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [10]},
    ]
    packed = PrefixSharedForward(row_tokens=64).collator(0, None)(examples)
    single = _shared_batch()
    assert packed["input_ids"].shape == (1, 9 + 5)
    assert packed["pair"][0].tolist() == [0] * 9 + [1] * 5 and packed["segment"][0].tolist() == [0] * 9 + [1] * 5
    assert packed["position_ids"][0, 9:].tolist() == single["position_ids"][1, :5].tolist()
    mask = _allowed(packed, None)[0, 0]
    alone = _allowed(single, None)[:, 0]
    assert torch.equal(mask[:9, :9], alone[0]) and torch.equal(mask[9:, 9:], alone[1, :5, :5])
    assert not mask[9:, :9].any() and not mask[:9, 9:].any()
    rule = mask_mod(packed["branch"], packed["visible"], packed["position_ids"], None, packed["segment"])
    assert torch.equal(create_mask(rule, 1, 1, 14, 14, device="cpu"), _allowed(packed, None))
    # A budget smaller than the two pairs together: a row each, as without packing.
    assert PrefixSharedForward(row_tokens=10).collator(0, None)(examples)["input_ids"].shape == (2, 9)


def test_a_sliding_window_is_measured_on_position_ids() -> None:
    batch = _shared_batch()
    mask = _allowed(batch, 2)[0, 0]
    # r2 sits at position 5 (p' is at 2): with a window of 2 it sees positions 4 and 5 only, i.e. r1 and itself.
    assert mask[8].nonzero().flatten().tolist() == [7, 8]
    assert mask[5].nonzero().flatten().tolist() == [1, 5]  # p' (position 2) sees prompt position 1 and itself


def test_the_flex_mask_mod_is_the_same_rule() -> None:
    batch = _shared_batch()
    for window in (None, 2):
        rule = mask_mod(batch["branch"], batch["visible"], batch["position_ids"], window, batch["segment"])
        flex = create_mask(rule, 2, 1, 9, 9, device="cpu")
        assert torch.equal(flex, _allowed(batch, window))


class EngineLike(torch.nn.Module):
    """A DeepSpeed engine's shape: the model under `.module`, and a `config` that is DeepSpeed's, not the model's."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.config = {"zero_optimization": {"stage": 2}}


def test_the_kernel_is_read_from_the_model_inside_any_wrapper(write_recipe) -> None:
    trainer = build_trainer(prepare(load_recipe(write_recipe(), ["model.attn_implementation=eager"])))
    assert attention_kernel(trainer.model) == "eager"  # through PEFT
    assert attention_kernel(EngineLike(trainer.model)) == "eager"  # through an engine with its own config


def _boolean_for_eager(kernel: str, descriptors, window):  # the DeepSpeed bug, on purpose
    branch, visible, positions, segment = descriptors
    return allowed(branch, visible, positions, window, segment)


@pytest.mark.slow
def test_a_layout_that_is_not_exact_falls_back_and_says_so(write_recipe, tmp_path: Path, monkeypatch) -> None:
    concat_dir, broken_dir = tmp_path / "concat", tmp_path / "broken"
    checkpointed = "training.gradient_checkpointing=true"  # trains on the dense row, whose mask is broken here
    run(load_recipe(write_recipe(), ["training.prefix_sharing=false", checkpointed, f"output.dir={concat_dir}"]))
    monkeypatch.setattr(masks, "_kernel_form", _boolean_for_eager)
    overrides = ["model.attn_implementation=eager", checkpointed, f"output.dir={broken_dir}"]
    summary = run(load_recipe(write_recipe(), overrides))
    layout = summary["layout"]
    assert layout["layout"] == "concatenated" and "log-probs differ" in layout["reason"]
    assert layout["max_diff_per_token"] > 1e-3
    losses = [[m["loss"] for m in read_metrics(d) if m["split"] == "train"] for d in (concat_dir, broken_dir)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the run trained on the exact layout


def test_a_recipe_that_insists_on_prefix_sharing_stops_with_one_line(cli, write_recipe, monkeypatch) -> None:
    monkeypatch.setattr(masks, "_kernel_form", _boolean_for_eager)
    path = write_recipe()
    dense = "training.gradient_checkpointing=true"  # trains on the dense row, whose mask is broken here
    result = cli("finetune", path, "model.attn_implementation=eager", "training.prefix_sharing=true", dense)
    assert_clean_error(result, "training.prefix_sharing", "not exact")
    assert not (path.parent / "run").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_kernel_without_custom_masks_falls_back(write_recipe, checkpointed: bool) -> None:
    """transformers builds no mask for a kernel it does not know, so the lean rows attend to everything: the
    self-check's comparison catches it, with checkpointing (whose dense row refuses the kernel) or without."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("hub_kernel", sdpa_attention_forward)  # a kernel psipo knows nothing about
    overrides = [f"training.gradient_checkpointing={str(checkpointed).lower()}"]
    trainer = build_trainer(prepare(load_recipe(write_recipe(), overrides)))
    step = trainer.forward_step
    assert isinstance(step, CheckedForward)
    masks.model_config(trainer.model)._attn_implementation_internal = "hub_kernel"
    trainer.check_layout()
    assert step.verdict.layout == "concatenated" and "log-probs differ" in step.verdict.reason
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    with pytest.raises(UnsupportedLayout, match="hub_kernel takes no custom mask"), torch.no_grad():
        step.shared(trainer.model, batch, form="dense")


def test_pairs_with_an_empty_tokenised_prompt_are_refused_with_one_line(cli, write_recipe, tmp_path: Path) -> None:
    from tests.conftest import write_jsonl

    # No BOS and a one-character prompt that merges with the response: TRL's split leaves no prompt token.
    rows = [{"prompt": "W", "chosen": "hat is 2?", "rejected": "hat is 3?"}] + [
        {"prompt": f"Question {i}?", "chosen": " Yes.", "rejected": " No."} for i in range(8)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = cli("finetune", write_recipe(), f"data.train={data}")
    if result.code == 0:
        pytest.skip("this tokenizer keeps a prompt token for the merged pair")
    assert_clean_error(result, "training.prefix_sharing", "tokenises to nothing")
