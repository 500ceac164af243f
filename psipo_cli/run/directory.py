"""The run directory: what a run leaves behind, and the rules for never clobbering one.

Layout: `recipe.yaml` (resolved), `metrics.jsonl` (one object per log/eval step), the adapter
(`adapter_model.safetensors`, `adapter_config.json`) with the tokenizer, `summary.json`, and TRL's
`checkpoint-N/` folders. Files are written whole or not at all (`files`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from psipo_cli.errors import UserError
from psipo_cli.recipe.loader import dump_recipe
from psipo_cli.recipe.schema import SAMPLING_LOSSES, Recipe
from psipo_cli.run.files import append_line, write_atomic
from psipo_cli.run.lock import LOCK_FILE, refuse_if_held

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LIBRARIES = (
    "psipo",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "deepspeed",
)


def check_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    """Fail before any work if the run directory is unusable or holds a run we were not told to replace."""
    where = "output.dir"
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is a file", where=where)
    refuse_if_held(path)  # before any other complaint: a live run there is the thing to know
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise UserError(
            f"{path} already holds a run; pass --overwrite to replace it or --resume to continue", where=where
        )
    if overwrite and path.is_dir() and not (path / RECIPE_FILE).exists() and _foreign(path):
        raise UserError(f"{path} is not empty and is not a psipo run; refusing to delete it", where=where)
    check_writable(path, where)


def _foreign(path: Path) -> bool:
    """Whether `path` holds anything but a psipo lock: a directory psipo must not delete."""
    return any(child.name != LOCK_FILE for child in path.iterdir())


def check_writable(path: Path, where: str) -> None:
    """`path` can be created or written: a temporary file goes into its nearest existing ancestor."""
    parent = _existing_ancestor(path)
    try:  # os.access says yes to root even on a read-only mount: try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UserError(f"{parent} is not writable ({err.strerror})", where=where) from None


def _existing_ancestor(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def checkpoint_bytes(model: Any) -> int:
    """Rough size of one checkpoint: trainable weights in fp32 plus Adam's two moments, and the RNG/state files."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3 + 2**20


def check_free_space(path: Path, checkpoint_size: int) -> None:
    """Fail now rather than after an hour: room for two checkpoints and the final adapter, plus 64 MiB."""
    needed = 2 * checkpoint_size + checkpoint_size // 3 + 64 * 2**20
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed:
        raise UserError(
            f"only {free / 2**20:,.0f} MiB free, a run needs about {needed / 2**20:,.0f} MiB (two checkpoints "
            "and the adapter)",
            where="output.dir",
        )


def create_run_dir(path: Path, overwrite: bool) -> None:
    """The run directory, emptied with `overwrite`: all but the lock this run holds."""
    if overwrite and path.is_dir():
        for child in path.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """recipe.yaml: the resolved recipe, which every later command (eval, generate, merge, plot) loads back."""
    write_atomic(run_dir / RECIPE_FILE, dump_recipe(recipe))


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def data_unit(recipe: Recipe) -> str:
    """What a run's data are counted in (summary.json's train_<unit>, the banner, the card): prompts for the stages
    that sample their own responses (rlhf, online_psipo), pairs for the others."""
    return "prompts" if recipe.objective.loss in SAMPLING_LOSSES else "pairs"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def resolve_run(target: Path, finished: bool = True) -> tuple[Recipe, Path]:
    """(recipe, run directory) of a run (a finished one unless told otherwise), given its directory or the recipe
    whose output.dir it is."""
    from psipo_cli.recipe.loader import load_recipe

    if target.is_dir():
        if not (target / RECIPE_FILE).is_file():
            raise UserError("not a psipo run directory (no recipe.yaml)", where=str(target))
        recipe, run_dir = load_recipe(target / RECIPE_FILE), target
    elif target.is_file():
        recipe = load_recipe(target)
        run_dir = Path(recipe.output.dir)
    else:
        raise UserError("no such run directory or recipe", where=str(target))
    if finished:
        require_trained(run_dir)
    return recipe, run_dir


def require_trained(run_dir: Path) -> None:
    if not (run_dir / "adapter_config.json").is_file():
        raise UserError("this run has not finished training (no adapter_config.json)", where=str(run_dir))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records. A run being written, or killed mid-append, may end in a half line: it is left out
    (resume logs that step again); a bad line anywhere else is the file's problem."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"line {number} is not JSON", where=str(path)) from None
    return records


# Trainer's closing log line (train_runtime, train_loss, ...) is a summary, not a step: it goes to summary.json.
_END_OF_TRAINING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}


class MetricsFile(TrainerCallback):
    """Append one JSON object per logging or evaluation step to metrics.jsonl (main process only)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or _END_OF_TRAINING_KEYS & logs.keys():
            return
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        record: dict[str, Any] = {"step": state.global_step, "split": split}
        record.update({key.removeprefix("eval_"): value for key, value in logs.items()})
        append_line(self.path, json.dumps(record))
