"""Attention masks of the prefix-shared layout, in the form each attention kernel needs.

A shared row is described per token, not by an L×L matrix, so the collator stays cheap and flex attention (its
block mask compiled on a GPU) needs none: `branch` (0 prompt, 1 chosen, 2 rejected incl. p', −1 padding),
`visible` (a bit mask of the branches that may see the token: prompt tokens 0b111, the prompt's last token 0b011
because the rejected branch sees p' instead, chosen 0b010, rejected 0b100, padding 0), `position_ids` and `segment`
(which of the row's packed pairs the token belongs to; −1 padding). Query i may attend key j when

    j ≤ i  and  segment[i] = segment[j]  and  bit branch[i] of visible[j] is set
    [and position[i] − position[j] < window on sliding layers]

and a padding query sees itself only (no empty softmax row). Models mixing full and sliding layers (Gemma-2/3,
Qwen2 with max_window_layers) get one mask per layer type, as transformers' own `causal_mask_mapping` dict.

Each kernel reads the mask differently, and a wrong form is silently wrong rather than an error:
- sdpa takes booleans (True = attend);
- eager *adds* the mask to the scores, so it gets 0 / finfo.min floats;
- flex_attention adds any tensor that is not a `BlockMask` to the scores (a boolean mask then masks nothing), so
  it gets a `BlockMask` built from the per-token descriptors: block-sparse, no L×L tensor on a GPU.
Any other kernel (flash_attention_2, hub kernels) takes no custom mask: `UnsupportedLayout`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

FULL, SLIDING = "full_attention", "sliding_attention"
KERNELS = ("eager", "sdpa", "flex_attention")


class UnsupportedLayout(Exception):
    """The model cannot run the prefix-shared layout exactly; the message says why (shown to the user)."""


def model_config(model: Any) -> PretrainedConfig:
    """The transformers config of the model inside any wrapper (PEFT, DDP, a DeepSpeed engine).

    `model.config` is not enough: a `DeepSpeedEngine` has a `config` of its own (DeepSpeed's), so reading the kernel
    name from it silently gave the default.
    """
    for module in model.modules():  # outermost first: the first transformers model is the causal LM itself
        if isinstance(module, PreTrainedModel):
            return module.config
    raise UnsupportedLayout(f"no transformers model inside {type(model).__name__}")


def attention_kernel(model: Any) -> str:
    return model_config(model)._attn_implementation or "eager"


def layer_windows(config: PretrainedConfig) -> dict[str, int | None]:
    """{layer type: sliding window or None} for the layer types the model uses."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    types = set(getattr(text, "layer_types", None) or [SLIDING if window else FULL])
    unknown = sorted(types - {FULL, SLIDING})
    if unknown:
        raise UnsupportedLayout(f"layer types {unknown} have no prefix-shared mask")
    if SLIDING in types and not window:
        raise UnsupportedLayout("sliding-window layers without a sliding_window size")
    return {kind: window if kind == SLIDING else None for kind in sorted(types)}


def _query_bit(branch: Tensor) -> Tensor:
    """The bit of `visible` a query reads: its branch, or for padding bit 3, which no token sets."""
    return torch.where(branch < 0, 3, branch.to(torch.int32)).to(torch.int32)


def allowed(branch: Tensor, visible: Tensor, positions: Tensor, window: int | None, segment: Tensor) -> Tensor:
    """(B, 1, L, L) bool: may query i attend key j (see the module docstring)."""
    length = branch.size(1)
    index = torch.arange(length, device=branch.device)
    causal = index[:, None] >= index[None, :]  # (L, L)
    own = _query_bit(branch)[:, :, None]  # (B, L, 1)
    sees = ((visible.to(torch.int32)[:, None, :] >> own) & 1).bool()  # (B, L, L)
    mask = causal & sees & (segment[:, :, None] == segment[:, None, :])
    if window is not None:
        mask &= (positions[:, :, None] - positions[:, None, :]) < window
    mask |= torch.eye(length, dtype=torch.bool, device=branch.device) & (branch < 0)[:, :, None]
    return mask[:, None]


def mask_mod(branch: Tensor, visible: Tensor, positions: Tensor, window: int | None, segment: Tensor) -> Any:
    """The rule of `allowed` as a flex_attention mask_mod(b, h, q, k), evaluated per block by flex."""
    own_branch = _query_bit(branch)
    bits = visible.to(torch.int32)

    def rule(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        ok = (q >= k) & (((bits[b, k] >> own_branch[b, q]) & 1) == 1) & (segment[b, q] == segment[b, k])
        if window is not None:
            ok = ok & ((positions[b, q] - positions[b, k]) < window)
        return ok | ((q == k) & (branch[b, q] < 0))

    return rule


def block_mask(branch: Tensor, visible: Tensor, positions: Tensor, window: int | None, segment: Tensor) -> Any:
    """The same rule as `allowed`, as a flex_attention `BlockMask`: block-sparse for the kernel (the blocks between
    two packed pairs are skipped, not computed and masked)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = branch.shape
    rule = mask_mod(branch, visible, positions, window, segment)
    # Compiled on a GPU, as transformers does: uncompiled, create_block_mask evaluates the rule over the dense L×L
    # grid while building. On CPU (tests) the compile costs more than the grid.
    compiled = branch.device.type == "cuda"
    return create_block_mask(rule, batch, None, length, length, device=branch.device, _compile=compiled)


def _kernel_form(kernel: str, descriptors: tuple[Tensor, ...], window: int | None) -> Any:
    branch, visible, positions, segment = descriptors
    if kernel == "flex_attention":
        return block_mask(branch, visible, positions, window, segment)
    mask = allowed(branch, visible, positions, window, segment)
    if kernel == "eager":  # added to the scores: 0 where allowed, the most negative float elsewhere
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def attention_masks(model: Any, branch: Tensor, visible: Tensor, positions: Tensor, segment: Tensor) -> Any:
    """The `attention_mask` argument for `model`: one mask, or {layer type: mask} when layers differ."""
    config = model_config(model)
    kernel = config._attn_implementation or "eager"
    if kernel not in KERNELS:
        raise UnsupportedLayout(f"attention kernel {kernel} takes no custom mask (use eager, sdpa or flex_attention)")
    windows = layer_windows(config)
    descriptors = (branch, visible, positions, segment)
    masks = {kind: _kernel_form(kernel, descriptors, window) for kind, window in windows.items()}
    return next(iter(masks.values())) if len(masks) == 1 else masks
