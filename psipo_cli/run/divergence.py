"""Divergence: a step whose loss or gradient norm is not finite is a bad step. Its update is dropped, it saves no
checkpoint, and `training.max_bad_steps` bad steps in a row stop the run with one line naming the step and the
newest complete checkpoint (which is kept: no bad step saves, so rotation never pushes it out).

Every process takes the same decision (the flags are reduced over processes), so all stop at the same step and
none waits alone in a collective. Where psipo cannot drop an update, the first bad step stops the run:
- under DeepSpeed the engine steps inside `backward`, before any callback sees the step;
- with fp16 the loss scaler already skips steps whose gradients overflowed: those are counted (`scaler_skipped`),
  not treated as bad, and only a non-finite loss is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from psipo_cli.errors import EXIT_DIVERGED, RunStopped
from psipo_cli.run.checkpoints import checkpoints
from psipo_cli.training.distributed import max_over_processes


class DivergenceGuard(TrainerCallback):
    """Watches every optimizer step of `trainer`; `install` hooks it in."""

    def __init__(self, trainer: Any, max_bad_steps: int) -> None:
        self.trainer, self.limit = trainer, max_bad_steps
        self.in_row = self.bad_total = self.scaler_skipped = 0
        self.first_bad_in_row: int | None = None
        self.stopped_at: int | None = None
        self._losses: list[torch.Tensor] = []
        self._bad = False

    @classmethod
    def install(cls, trainer: Any, max_bad_steps: int) -> DivergenceGuard:
        """Add the guard to `trainer`, its `training_step` reporting each micro-batch's loss to it."""
        guard = cls(trainer, max_bad_steps)
        step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = step(*args, **kwargs)
            guard._losses.append(loss.detach())
            return loss

        trainer.training_step = training_step
        trainer.add_callback(guard)
        return guard

    def _can_drop_update(self) -> bool:
        return not (self.trainer.is_deepspeed_enabled or self.trainer.args.fp16)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        losses, self._losses = self._losses, []
        bad = any(not torch.isfinite(loss).all() for loss in losses)
        trainable = [p for p in model.parameters() if p.grad is not None]
        if trainable and self._can_drop_update():  # fp16: overflowing gradients are the scaler's to skip
            bad = bad or not math.isfinite(torch.stack([p.grad.detach().float().norm() for p in trainable]).norm())
        self._bad = max_over_processes([float(bad)], args.device)[0] > 0
        if self._bad and self._can_drop_update():
            for param in trainable:  # no gradient: AdamW leaves the weight and its moments as they were
                param.grad = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.accelerator.optimizer_step_was_skipped:
            self.scaler_skipped += 1
        if not self._bad:
            self.in_row, self.first_bad_in_row = 0, None
            return
        self.bad_total += 1
        self.in_row += 1
        self.first_bad_in_row = self.first_bad_in_row or state.global_step
        control.should_save = False
        if self.in_row >= self.limit or not self._can_drop_update():
            self.stopped_at = state.global_step
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs is not None and "loss" in logs:  # training logs only
            logs["bad_steps"] = self.bad_total
            if args.fp16:
                logs["scaler_skipped_steps"] = self.scaler_skipped

    def check(self, run_dir: Path) -> None:
        """After training: raise the run's one line if the guard stopped it."""
        if self.stopped_at is None:
            return
        saved = checkpoints(run_dir)
        kept = f"the newest good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before it"
        steps = (
            f"step {self.stopped_at}"
            if self.first_bad_in_row == self.stopped_at
            else f"steps {self.first_bad_in_row}-{self.stopped_at}"
        )
        raise RunStopped(
            f"loss or gradient norm not finite at {steps} ({self.in_row} bad step(s) in a row, training.max_bad_steps "
            f"{self.limit}); {kept}; lower training.learning_rate or check the data, then --resume from it",
            EXIT_DIVERGED,
        )
