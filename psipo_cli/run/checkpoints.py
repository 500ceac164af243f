"""Crash-safe checkpoints, resume, and a clean stop on SIGINT/SIGTERM.

The Trainer writes `checkpoint-N/` (adapter, optimizer, scheduler, RNG states, trainer_state.json with the step,
from which the data position follows: the sampler is seeded and the Trainer skips the batches already seen). A
checkpoint counts as complete only once `psipo-complete.json` is in it: every process flushes the folder to disk,
all wait for each other (each writes its own RNG state, under ZeRO its own optimizer shard), and only then is the
mark renamed in. A job killed or a write failing mid-checkpoint leaves a folder without it, which resume ignores
and removes. Old checkpoints are deleted here, after the new one is sealed, never before (the Trainer's own
rotation runs before the mark exists and could leave no complete checkpoint at all).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from psipo_cli.errors import DISK_ERRNOS, EXIT_WRITE_FAILED, RunStopped, UserError
from psipo_cli.run.directory import METRICS_FILE, read_metrics
from psipo_cli.run.files import fsync_tree, write_atomic, write_jsonl_atomic
from psipo_cli.training.distributed import barrier, max_over_processes

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


def newest_complete(run_dir: Path) -> str:
    """'the newest complete checkpoint is PATH', for the line a stopped run ends with."""
    saved = checkpoints(run_dir)
    return f"the newest complete checkpoint is {saved[-1]}" if saved else "no checkpoint is complete"


def stop_if_a_write_failed(run_dir: Path, err: BaseException) -> None:
    """Turn a failed write (a full disk, a quota, a checkpoint cut short) into the run's one line."""
    saved = checkpoints(run_dir)
    newest_step = checkpoint_step(saved[-1]) if saved else -1
    partial = [p for p in checkpoints(run_dir, complete=False) if checkpoint_step(p) > newest_step]
    disk = isinstance(err, OSError) and err.errno in DISK_ERRNOS
    if not (partial or disk):
        return
    what = f"writing {partial[-1].name}" if partial else "a write into the run directory"
    free = shutil.disk_usage(run_dir).free / 2**20 if run_dir.exists() else 0.0
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
    raise RunStopped(
        f"{what} failed ({reason}; {free:,.0f} MiB free there); {newest_complete(run_dir)}; make room and continue "
        "with --resume",
        EXIT_WRITE_FAILED,
    ) from None


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
    """Seal each checkpoint once every process has written all of it, then keep the newest `keep` complete ones
    (None: all). The mark also holds `record` (what the run trained on, see `fingerprint`), sealed with it."""

    def __init__(self, record: dict[str, Any] | None = None, keep: int | None = None) -> None:
        self.record = record or {}
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run_dir = Path(args.output_dir)
        folder = run_dir / f"checkpoint-{state.global_step}"
        fsync_tree(folder)  # this process's files (its RNG state, its shard) are on disk ...
        barrier()  # ... and so are every other process's
        if state.is_world_process_zero:
            mark = {"step": state.global_step, **self.record}
            write_atomic(folder / COMPLETE_MARK, json.dumps(mark) + "\n")
            rotate(run_dir, self.keep)


def rotate(run_dir: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (by step; incomplete ones are resume's business)."""
    if keep is None:
        return
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.received: int | None = None
        self.on_signal = on_signal  # runs first, and may raise: a launcher's SIGTERM after another process died
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
        if self.on_signal is not None:
            self.on_signal()
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
