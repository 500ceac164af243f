"""What a checkpoint was trained on, so that `--resume` continues the same run or says what changed.

Every complete checkpoint's mark (`checkpoints.COMPLETE_MARK`) records the run's fingerprint: the content hash of
the training pairs as loaded, the base model's identity, the number of processes and every recipe key that shapes
training. On resume the current fingerprint is compared with the checkpoint's before anything is loaded or written;
a difference is refused unless `--force-resume`, which is then recorded in the marks that follow and summary.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psipo_cli.data.pairs import PreferenceData
from psipo_cli.errors import UserError, shown
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.checkpoints import COMPLETE_MARK, checkpoint_step
from psipo_cli.run.directory import RECIPE_FILE
from psipo_cli.run.files import write_atomic

# Recipe keys (and the sections under them) that change how a run is watched, saved, spread or reported, not what it
# computes. max_steps/num_train_epochs: extending (or shortening) a run is legitimate; a decaying schedule is then
# recomputed over the new length from the restored step. The training pairs are compared by content, so their path,
# column mapping and too_long policy matter only through it. The batch is compared as pairs per optimizer step
# (per-device batch × accumulation × processes), so a run may resume on another number of processes with the same
# global batch; whether its optimizer state can follow is `check_partitioning`'s question. Packed runs are the
# exception: their batches are planned by tokens in rows per micro-batch and dealt out over micro-batches and
# processes (token_budget.py), so any other split of the same product gives every later step other pairs.
FREE_KEYS = (
    "description",
    "output",
    "distributed",
    "data.train",
    "data.columns",
    "data.too_long",
    "data.eval",
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.max_bad_steps",
    "training.eval_steps",
    "training.per_device_eval_batch_size",
    "training.dataloader_num_workers",
    "training.gradient_checkpointing",  # recomputes activations: same numbers, less memory
    "training.prefix_sharing",  # the layouts give the same log-probs (the self-check proves it on the model)
    "objective.precompute_ref_log_probs",  # the same reference, computed before training or every step
    "training.max_steps",
    "training.num_train_epochs",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
)
# Files of a local model (or starting adapter) whose size and mtime identify it: retrained in place, it differs.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", "config.json", ".index.json", "tokenizer.json")


def model_identity(name_or_path: str, revision: str | None) -> dict[str, Any]:
    """Name and revision; for a local directory also [size, mtime] of its config, tokenizer and weight files."""
    path = Path(name_or_path)
    files = (
        sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)) if path.is_dir() else []
    )
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return {"name_or_path": name_or_path, "revision": revision, "files": stats}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _shaping(dotted: str) -> bool:
    return not any(dotted == free or dotted.startswith(f"{free}.") for free in FREE_KEYS)


def run_fingerprint(recipe: Recipe, train: PreferenceData, processes: int) -> dict[str, Any]:
    """The fingerprint of a run about to train: flat, JSON-serialisable, compared key by key."""
    keys = {k: v for k, v in _flatten(recipe.model_dump(mode="json")).items() if _shaping(k)}
    init_from = recipe.adapter.init_from
    return {
        **keys,
        "data.train content": train.fingerprint,
        "model files": model_identity(recipe.model.name_or_path, recipe.model.revision)["files"],
        "adapter.init_from files": model_identity(init_from, None)["files"] if init_from else {},
        # The reward model a sampling stage trains against: retrained in place, it is another objective.
        "rollout.reward_model files": model_identity(recipe.rollout.reward_model, None)["files"]
        if recipe.rollout
        else {},
        "pairs per step": recipe.training.per_device_train_batch_size
        * recipe.training.gradient_accumulation_steps
        * processes,
        "packed batches (rows, accumulation, processes)": [
            recipe.training.per_device_train_batch_size,
            recipe.training.gradient_accumulation_steps,
            processes,
        ]
        if recipe.training.pack_tokens
        else None,
    }


def _detail(old: Any, new: Any) -> str:
    """'0.5 -> 0.1'; for file stats, which files differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return ", ".join(sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name)))
    return f"{shown(old)} -> {shown(new)}"


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, what changed), by key. A key on one side only is a psipo version adding or removing it, not a change."""
    common = sorted(recorded.keys() & current.keys())
    return [(k, _detail(recorded[k], current[k])) for k in common if recorded[k] != current[k]]


@dataclass
class ResumeRecord:
    """What each checkpoint's mark records, and what a (forced) resume changed."""

    fingerprint: dict[str, Any]
    forced: list[str] = field(default_factory=list)  # every change forced into this run, oldest first
    replaced_recipe_at: int | None = None  # the step whose recipe a forced resume just replaced

    def mark(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "forced_resume": self.forced}

    def keep_replaced_recipe(self, run_dir: Path) -> None:
        """Before a forced resume overwrites recipe.yaml (it states what the run finished with), keep the recipe the
        earlier steps trained with as recipe.until-step-N.yaml."""
        if self.replaced_recipe_at is not None and (run_dir / RECIPE_FILE).is_file():
            kept = run_dir / f"recipe.until-step-{self.replaced_recipe_at}.yaml"
            write_atomic(kept, (run_dir / RECIPE_FILE).read_text(encoding="utf-8"))


def check_resume(checkpoint: Path | None, current: dict[str, Any], force: bool, is_main: bool) -> ResumeRecord:
    """Compare the run about to train with `checkpoint`'s; refuse a changed run unless `force`."""
    if checkpoint is None:
        return ResumeRecord(current)
    mark = _read_mark(checkpoint)
    earlier = list(mark.get("forced_resume", []))
    if "fingerprint" not in mark:  # written by a psipo that recorded none: nothing to compare, don't break it
        if is_main:
            print(
                f"warning: --resume: {checkpoint.name} records no fingerprint (an older psipo wrote it); "
                "cannot check that the recipe, data and model are unchanged",
                file=sys.stderr,
            )
        return ResumeRecord(current, earlier)
    changed = differences(mark["fingerprint"], current)
    if not changed:
        return ResumeRecord(current, earlier)
    if not force:
        listed = "; ".join(f"{key} changed ({detail})" for key, detail in changed)
        raise UserError(
            f"{listed} since {checkpoint.name}; restore what changed, start a new run in another output.dir, "
            "or pass --force-resume to continue anyway",
            where="--resume",
        )
    step = checkpoint_step(checkpoint)
    return ResumeRecord(current, [*earlier, *(f"{key}: {detail} (at step {step})" for key, detail in changed)], step)


def check_partitioning(checkpoint: Path | None, processes: int, deepspeed: bool) -> None:
    """Refuse, before anything is loaded, a resume whose optimizer state cannot follow: DeepSpeed ZeRO shards for
    another number of processes (DeepSpeed refuses to re-split them, after loading the model), or a switch between
    DeepSpeed and a plain optimizer (whose state the other would silently not find)."""
    if checkpoint is None:
        return
    shards = sorted(checkpoint.glob("global_step*/*optim_states.pt"))
    where = "--resume"
    if bool(shards) != deepspeed:
        saved, now = ("DeepSpeed ZeRO", "without DeepSpeed") if shards else ("a plain optimizer", "under DeepSpeed")
        raise UserError(
            f"{checkpoint.name} holds the optimizer state of {saved}, and this run is {now}; resume with the "
            "distributed settings it was saved with",
            where=where,
        )
    if shards and len(shards) != processes:
        raise UserError(
            f"{checkpoint.name} holds DeepSpeed optimizer shards for {len(shards)} processes, which DeepSpeed cannot "
            f"re-split for {processes}; resume with {len(shards)} processes",
            where=where,
        )


def _read_mark(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / COMPLETE_MARK
    try:
        mark = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the checkpoint's completion mark ({err})", where=str(path)) from None
    return mark if isinstance(mark, dict) else {}
