"""The conformance matrix: on every architecture × attention kernel that runs on CPU, the default layout gives the
concatenated layout's per-sequence log-probs (fp32, 1e-5), or psipo falls back to it and says why. No cell may
differ silently.

Models are built tiny from their transformers config classes with random weights (no download), rows longer than
every sliding window, the tiny tokenizer's ids and the shipped pairs. The expected outcome of each cell is part of
the test, so a cell that silently starts falling back (a slower run, not a wrong one) is caught too. The table in
the README ("Exact on every model") is this matrix.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from trl.trainer.utils import add_fused_lm_head

from psipo_cli.training.forward import ConcatenatedForward, PrefixSharedForward, concatenated_from_shared
from psipo_cli.training.layout_check import CheckedForward
from tests.conftest import TINY_DATA

WINDOW = 6  # shorter than every test row (prompts alone are ~10 tokens)
PAD = 3
DIMS = {"vocab_size": 768, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

ARCHITECTURES: dict[str, Any] = {
    "llama": lambda: LlamaConfig(**DIMS, **HEADS),
    "mistral (window)": lambda: MistralConfig(**DIMS, **HEADS, sliding_window=WINDOW),
    "qwen2": lambda: Qwen2Config(**DIMS, **HEADS),
    "qwen2 (window on layer 2)": lambda: Qwen2Config(
        **DIMS, **HEADS, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": lambda: Qwen3Config(**DIMS, **HEADS, head_dim=16),
    "gemma2 (soft-capping, local/global)": lambda: Gemma2Config(
        **DIMS, **HEADS, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    ),
    "gemma3 text (local/global)": lambda: Gemma3TextConfig(
        **DIMS, **HEADS, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3 (window)": lambda: Phi3Config(
        **DIMS, **HEADS, sliding_window=WINDOW, pad_token_id=PAD, bos_token_id=1, eos_token_id=2
    ),
    "mixtral (MoE)": lambda: MixtralConfig(**DIMS, **HEADS, num_local_experts=4, num_experts_per_tok=2),
    "gpt2 (absolute positions)": lambda: GPT2Config(
        vocab_size=768, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    ),
}
KERNELS = ["eager", "sdpa", "flex_attention"]
NOT_IN_TRANSFORMERS = {("gpt2 (absolute positions)", "flex_attention"), ("gemma2 (soft-capping, local/global)", "sdpa")}
# Where the default layout is not the shared one, and why (the one line psipo prints).
FALLS_BACK = {"mixtral (MoE)": "router balancing loss"}


@pytest.fixture(autouse=True, scope="module")
def _static_flex_compiles(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """flex_attention compiles per shape on CPU; after a second shape dynamo would retry with dynamic shapes, whose
    CPU code fails to build in torch 2.13 (seen: a C++ compile error on the second architecture). Keep shapes static
    and let every architecture have its own compile, in a cache of this run's own: a shared one left half-written by
    a killed run fails every later compile ("file too short")."""
    import torch._dynamo

    config = torch._dynamo.config
    saved = config.automatic_dynamic_shapes, config.cache_size_limit, os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    config.automatic_dynamic_shapes, config.cache_size_limit = False, 64
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    config.automatic_dynamic_shapes, config.cache_size_limit = saved[:2]
    if saved[2] is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved[2]


def _model(name: str, kernel: str) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name](), attn_implementation=kernel, dtype=torch.float32)
    add_fused_lm_head(model)  # what TRL's trainer does: forward(..., fused_lm_head=True) returns log-probs
    return model.eval()


def _examples(count: int = 6) -> list[dict[str, list[int]]]:
    from transformers import AutoTokenizer

    from tests.conftest import TINY_MODEL

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()[:count]]
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        out.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [2],
                "rejected_ids": tokenizer(row["rejected"] + " and more words", add_special_tokens=False)["input_ids"]
                + [2],
            }
        )
    return out


def _cell(name: str, kernel: str) -> tuple[str, str]:
    """(outcome, detail) of one cell, asserting the default path equals TRL's concatenated rows either way."""
    model, examples = _model(name, kernel), _examples()
    concat = ConcatenatedForward()
    step = CheckedForward(PAD)
    shared_batch = step.collator(PAD, None)(examples)
    with torch.no_grad():
        plain = concat(model, concat.collator(PAD, None)(examples))  # TRL's own collator, not our conversion
        verdict = step.check(model, shared_batch)
        default = step(model, shared_batch, router_aux=True)
    for got, want in ((default.chosen, plain.chosen), (default.rejected, plain.rejected)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if verdict.layout == "prefix-shared":
        return "exact", f"max |Δ| {verdict.max_diff_per_token:.0e}"
    assert verdict.reason, "a fall-back always says why"
    return "falls back", verdict.reason


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_default_layout_equals_the_concatenated_one(name: str, kernel: str) -> None:
    if (name, kernel) in NOT_IN_TRANSFORMERS:
        pytest.skip(f"transformers has no {kernel} for {name}")
    outcome, detail = _cell(name, kernel)
    expected = "falls back" if name in FALLS_BACK else "exact"
    assert outcome == expected, detail
    if name in FALLS_BACK:
        assert FALLS_BACK[name] in detail


def test_rows_are_longer_than_the_window() -> None:
    batch = PrefixSharedForward().collator(PAD, None)(_examples())
    assert int(batch["position_ids"].max()) > 2 * WINDOW


@pytest.mark.parametrize("row_tokens", [None, 60], ids=["row per pair", "packed"])
def test_concatenated_from_shared_rebuilds_trls_rows(row_tokens: int | None) -> None:
    """The fall-back and the self-check's comparison rebuild TRL's own rows, truncated, from shared or packed rows."""
    examples = _examples()
    shared = PrefixSharedForward(row_tokens).collator(PAD, 20)(examples)
    if row_tokens:
        assert shared["input_ids"].size(0) < len(examples)
    trl = ConcatenatedForward().collator(PAD, 20)(examples)
    rebuilt = concatenated_from_shared(shared, PAD)
    width = trl["input_ids"].size(1)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(rebuilt[key][:, :width], trl[key]), key
        assert not rebuilt[key][:, width:].any() or key == "input_ids"


PACKED_CELLS = [
    *[(name, kernel) for name in ARCHITECTURES if name not in FALLS_BACK for kernel in ("eager", "sdpa")],
    ("llama", "flex_attention"),  # the BlockMask path: blocks between packed pairs skipped, not masked
    ("mistral (window)", "flex_attention"),  # and with a window measured on restarted positions
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kernel"), PACKED_CELLS)
def test_the_dense_shared_row_equals_the_concatenated_one(name: str, kernel: str) -> None:
    """The dense `[prompt | chosen | p' | rejected]` row, which checkpointed models and batches of very unequal
    response lengths use instead of the lean form, gives the concatenated layout's log-probs (the default cells'
    self-check compares both forms)."""
    if (name, kernel) in NOT_IN_TRANSFORMERS:
        pytest.skip(f"transformers has no {kernel} for {name}")
    model, examples = _model(name, kernel), _examples()
    concat, shared = ConcatenatedForward(), PrefixSharedForward()
    batch = shared.collator(PAD, None)(examples)
    with torch.no_grad():
        plain = concat(model, concat.collator(PAD, None)(examples))
        got = shared(model, batch, form="dense")
    for a, b in ((got.chosen, plain.chosen), (got.rejected, plain.rejected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kernel"), PACKED_CELLS)
def test_packed_rows_equal_the_concatenated_ones(name: str, kernel: str) -> None:
    """Several pairs per row (no attention between them, positions restarting) give each pair the concatenated
    layout's log-probs, windows and local/global layers included."""
    if (name, kernel) in NOT_IN_TRANSFORMERS:
        pytest.skip(f"transformers has no {kernel} for {name}")
    model, examples = _model(name, kernel), _examples()
    concat, packed = ConcatenatedForward(), PrefixSharedForward(row_tokens=80)
    batch = packed.collator(PAD, None)(examples)
    assert 1 < batch["input_ids"].size(0) < len(examples)  # several pairs share a row
    with torch.no_grad():
        plain = concat(model, concat.collator(PAD, None)(examples))
        got = packed(model, batch)
    for a, b in ((got.chosen, plain.chosen), (got.rejected, plain.rejected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.chosen_tokens, plain.chosen_tokens) and torch.equal(
        got.rejected_tokens, plain.rejected_tokens
    )


@pytest.mark.slow
@pytest.mark.parametrize("row_tokens", [None, 80], ids=["lean", "packed"])
def test_shared_rows_give_the_concatenated_lora_gradients(row_tokens: int | None) -> None:
    """Gradients reach the prompt through the lean form's cached keys and values, and through packed rows, as they do
    through TRL's rows (a window on one layer, prompts of unequal length)."""
    from peft import LoraConfig, get_peft_model

    examples = _examples()
    grads = []
    for step, collate in (
        (ConcatenatedForward(), ConcatenatedForward().collator(PAD, None)),
        (PrefixSharedForward(row_tokens), PrefixSharedForward(row_tokens).collator(PAD, None)),
    ):
        torch.manual_seed(1)
        model = get_peft_model(
            _model("qwen2 (window on layer 2)", "sdpa"), LoraConfig(r=4, target_modules="all-linear")
        )
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.data.normal_(0, 0.1)  # B = 0 at init would give A no gradient
        out = step(model, collate(examples))
        weights = torch.arange(1.0, len(examples) + 1)  # a different weight per pair: a pair mix-up changes them
        (weights * out.chosen - 0.5 * weights.flip(0) * out.rejected).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)
