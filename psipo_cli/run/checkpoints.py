"""Crash-safe checkpoints, resume, and a clean stop on SIGINT/SIGTERM.

The Trainer writes `checkpoint-N/` (adapter, optimizer, scheduler, RNG states, trainer_state.json with the step,
from which the data position follows: the sampler is seeded and the Trainer skips the batches already seen). A
checkpoint counts as complete only once `psipo-complete.json` is in it, written by rename after the Trainer has
written everything else; a job killed mid-write leaves a folder without it, which resume ignores and removes.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from psipo_cli.errors import UserError
from psipo_cli.run.directory import METRICS_FILE, read_metrics, write_atomic, write_jsonl_atomic
from psipo_cli.training.distributed import max_over_processes

COMPLETE_MARK = "psipo-complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoints(run_dir: Path, complete: bool = True) -> list[Path]:
    """checkpoint-N folders of a run, oldest first: the complete ones, or the incomplete ones."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0]
    return sorted((p for p in found if (p / COMPLETE_MARK).is_file() == complete), key=checkpoint_step)


def resume_point(run_dir: Path, path: Path | None) -> Path:
    """The checkpoint to continue from: PATH (a checkpoint, or a run directory's newest), else output.dir's newest."""
    where = "--resume"
    target = path or run_dir
    if not target.is_dir():
        raise UserError(f"{target} does not exist; nothing to resume", where=where)
    if checkpoint_step(target) >= 0:
        if not (target / COMPLETE_MARK).is_file():
            raise UserError(f"{target} is incomplete (the job stopped while writing it)", where=where)
        return target
    complete = checkpoints(target)
    if not complete:
        raise UserError(f"no complete checkpoint in {target}; start the run without --resume", where=where)
    return complete[-1]


def prepare_resume(run_dir: Path, checkpoint: Path) -> None:
    """Drop what the crashed job wrote after `checkpoint`: later metrics lines and incomplete checkpoints.

    The resumed run logs those steps again, so metrics.jsonl ends up with every step exactly once.
    """
    step = checkpoint_step(checkpoint)
    for partial in checkpoints(run_dir, complete=False):
        shutil.rmtree(partial, ignore_errors=True)
    if (run_dir / METRICS_FILE).exists():
        write_jsonl_atomic(run_dir / METRICS_FILE, [m for m in read_metrics(run_dir) if m["step"] <= step])


class MarkComplete(TrainerCallback):
    """Seal each checkpoint once the Trainer has written all of it (main process); the mark also holds `record`
    (what the run trained on, see `fingerprint`), sealed with it."""

    def __init__(self, record: dict[str, Any] | None = None) -> None:
        self.record = record or {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark = {"step": state.global_step, **self.record}
            write_atomic(folder / COMPLETE_MARK, json.dumps(mark) + "\n")


class CurrentIntervals(TrainerCallback):
    """Log, evaluate and save at the recipe's intervals after a resume too.

    The Trainer restores logging/eval/save_steps from the checkpoint's trainer_state.json and only warns in its log,
    so a resumed run kept the old intervals while its recipe.yaml stated the new ones.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state.compute_steps(args, state.max_steps)


class StopOnSignal(TrainerCallback):
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. A second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        print(f"{name}: saving a checkpoint after this step (send it again to stop at once)", file=sys.stderr)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._anyone_received(args):
            control.should_save = True
            control.should_training_stop = True

    def _anyone_received(self, args: Any) -> bool:
        """Whether any process got a signal: all must stop at the same step, or the next collective hangs."""
        return max_over_processes([float(self.received is not None)], args.device)[0] > 0
