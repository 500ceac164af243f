"""The start-up self-check that guards prefix sharing on the user's own model.

Prefix sharing is exact only if the model reads the shared row's mask and position ids the way psipo assumes;
a kernel, wrapper or remote-code model nobody tested can break that silently (a run that trains on leaked
attention still "converges"). So before the first batch is used, `CheckedForward` scores it both ways — the
prefix-shared row and TRL's concatenated rows — with no gradient and dropout off. At that point the policy equals
the reference (a fresh LoRA adapter adds zero; a starting adapter is also the reference), so one comparison
covers both. Both forms of the shared layout are compared: the lean rows and the dense row that a model under
gradient checkpointing uses. If either differs beyond the dtype's noise, or cannot run at all, the run continues
on the concatenated layout and says so — or stops with one line when the recipe insists on prefix sharing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from psipo_cli.errors import UserError
from psipo_cli.models.masks import UnsupportedLayout
from psipo_cli.training.distributed import max_over_processes
from psipo_cli.training.forward import (
    ConcatenatedForward,
    PairLogps,
    PrefixSharedCollator,
    PrefixSharedForward,
    concatenated_from_shared,
)

# Largest per-token difference (nats) between the layouts that is float noise, by compute dtype. Leaked attention
# moves trained models' log-probs by O(1) nats; a window ignored on tiny random models by ~1e-2. In half precision
# the check catches the former only, which is why the conformance tests run in float32.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class Verdict:
    """What the self-check found; `layout` is what the run uses from then on."""

    layout: str  # "prefix-shared" or "concatenated"
    max_diff_per_token: float | None  # None when the shared layout could not run
    tolerance: float
    seconds: float
    reason: str = ""  # why it fell back

    def describe(self) -> str:
        if self.layout == "prefix-shared":
            return f"prefix-shared (self-check: max |Δ| {self.max_diff_per_token:.1e} nats/token, {self.seconds:.2f} s)"
        return f"concatenated: prefix sharing fell back ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the forward runs in: autocast's if on, else the narrowest floating parameter dtype."""
    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    # bitsandbytes layers store packed integers and compute in their own dtype.
    dtypes |= {m.compute_dtype for m in model.modules() if isinstance(getattr(m, "compute_dtype", None), torch.dtype)}
    return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32


def max_diff_per_token(a: PairLogps, b: PairLogps) -> float:
    diffs = []
    for x, y, n in ((a.chosen, b.chosen, a.chosen_tokens), (a.rejected, b.rejected, a.rejected_tokens)):
        diffs.append(((x.float() - y.float()).abs() / n.clamp(min=1)).max())
    return float(torch.stack(diffs).max())


def _agree(model: Any, diff: float | None, reason: str) -> tuple[float | None, str]:
    """Every process takes the same decision: each checked its own first batch, and a process on the other
    layout (or one stopping alone) would leave the others waiting in a collective."""
    device = next(model.parameters()).device
    failed, largest = max_over_processes([float(bool(reason)), -1.0 if diff is None else diff], device)
    if failed and not reason:
        reason = f"another process found the layouts differ (max |Δ| {largest:.1e} nats/token)"
    return (largest if largest >= 0 else diff), reason


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forms(inputs: dict[str, Tensor]) -> list[str]:
    """The forms of prefix sharing a run may take on batches like `inputs`: a batch with lean rows runs them or the
    dense row (`PrefixSharedForward` picks per batch and model), so both are checked; packed batches are dense."""
    return ["lean", "dense"] if "lean_ids" in inputs else ["dense"]


class CheckedForward:
    """Prefix sharing that proves itself on the first batch it sees, then keeps whichever layout is exact."""

    def __init__(self, pad_token_id: int, strict: bool = False, row_tokens: int | None = None) -> None:
        self.shared, self.concatenated = PrefixSharedForward(row_tokens), ConcatenatedForward()
        self.pad_token_id = pad_token_id
        self.strict = strict  # the recipe said prefix_sharing: true, so falling back is an error
        self.verdict: Verdict | None = None

    def collator(self, pad_token_id: int, max_length: int | None) -> PrefixSharedCollator:
        return self.shared.collator(pad_token_id, max_length)

    def check(self, model: Any, inputs: dict[str, Tensor]) -> Verdict:
        """Compare both layouts on `inputs` (call under no_grad); decide the layout for the rest of the run."""
        started = time.perf_counter()
        tolerance = TOLERANCE.get(compute_dtype(model), TOLERANCE[torch.bfloat16])
        with _eval_mode(model):
            plain = self.concatenated(model, concatenated_from_shared(inputs, self.pad_token_id))
            try:
                diff: float | None = 0.0
                for form in _forms(inputs):  # every form the run may use: lean rows, and the dense row
                    shared = self.shared(model, inputs, router_aux=True, form=form)  # as the policy pass calls it
                    diff = max(diff, max_diff_per_token(plain, shared))
                    if diff > tolerance:
                        break
                reason = "" if diff <= tolerance else f"log-probs differ by {diff:.1e} nats/token > {tolerance:.0e}"
            except (UnsupportedLayout, RuntimeError, TypeError, ValueError) as err:  # a model that refuses the row
                diff, reason = None, str(err).splitlines()[0] if str(err) else type(err).__name__
        diff, reason = _agree(model, diff, reason)
        layout = "concatenated" if reason else "prefix-shared"
        self.verdict = Verdict(layout, diff, tolerance, time.perf_counter() - started, reason)
        if reason and self.strict:
            raise UserError(
                f"prefix sharing is not exact on this model ({reason}); set training.prefix_sharing: auto to fall "
                "back to the concatenated layout",
                where="training.prefix_sharing",
            )
        return self.verdict

    def __call__(self, model: Any, inputs: dict[str, Tensor], router_aux: bool = False) -> PairLogps:
        if self.verdict is None:
            with torch.no_grad():
                self.check(model, inputs)
        if self.verdict.layout == "prefix-shared":
            return self.shared(model, inputs, router_aux)
        return self.concatenated(model, concatenated_from_shared(inputs, self.pad_token_id), router_aux)

    def count_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.shared.count_tokens(inputs)


def forward_step_for(
    prefix_sharing: bool | str, pad_token_id: int, pack_tokens: int | None = None
) -> ConcatenatedForward | CheckedForward:
    """The forward step `training.prefix_sharing` asks for: false → concatenated; auto → checked, falls back;
    true → checked, a failed check stops the run. `pack_tokens`: shared rows hold several pairs (checked the same)."""
    if prefix_sharing is False:
        return ConcatenatedForward()
    return CheckedForward(pad_token_id, strict=prefix_sharing is True, row_tokens=pack_tokens)


def describe_layout(step: Any) -> str:
    """One line for the banner: the layout in use and what the self-check found."""
    if not isinstance(step, CheckedForward):
        return "concatenated (training.prefix_sharing: false)"
    packed = f", pairs packed into rows of ≤ {step.shared.row_tokens} tokens" if step.shared.row_tokens else ""
    if step.verdict is None:  # under DeepSpeed the check runs on the first batch of training
        return f"prefix-shared{packed}, checked against the concatenated layout on the first batch"
    return step.verdict.describe() + (packed if step.verdict.layout == "prefix-shared" else "")


def layout_summary(step: Any) -> dict[str, Any] | None:
    """What summary.json records about the layout (None for a reward model, which has none)."""
    if step is None:
        return None
    if not isinstance(step, CheckedForward):
        return {"layout": "concatenated", "reason": "training.prefix_sharing: false"}
    found = step.verdict.as_dict() if step.verdict else {"layout": "prefix-shared", "reason": "not checked"}
    return found | {"pack_tokens": step.shared.row_tokens}
