"""A run's logged metrics, read for plotting and comparing: its recipe, its metrics.jsonl records, and whether it
has finished.

Only `recipe.yaml` and `metrics.jsonl` are read, so a run still in progress can be loaded as well as a finished one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError
from psipo_cli.recipe.schema import ObjectiveSection, Recipe
from psipo_cli.run.directory import METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, read_metrics

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Run:
    """What the plots and the final-metrics table need of one run directory."""

    path: Path
    name: str
    recipe: Recipe
    records: list[dict[str, Any]]
    finished: bool

    @property
    def objective(self) -> ObjectiveSection:
        return self.recipe.objective

    @property
    def objective_label(self) -> str:
        """'IPO τ=0.5', 'ΨPO (logit) τ=0.1', 'reward model', 'RLHF τ=0.05', 'online IPO τ=0.5, mixture β=0.25'."""
        obj = self.objective
        if obj.loss == "reward":
            return "reward model"
        psi = obj.psi if len(obj.psi) <= 20 else obj.psi[:19] + "…"  # Ψ may be an expression in q
        if obj.loss == "online_psipo":
            name = "online IPO" if obj.psi == "identity" else f"online ΨPO ({psi})"
        else:
            name = {"psipo": f"ΨPO ({psi})", "rlhf": "RLHF"}.get(obj.loss, obj.loss.upper())
        label = f"{name} τ={obj.tau:g}"
        rollout = self.recipe.rollout
        return f"{label}, mixture β={rollout.mixture:g}" if rollout is not None and rollout.mixture else label

    @property
    def label(self) -> str:
        return f"{self.name} — {self.objective_label}"

    @property
    def unit(self) -> str:
        """Unit of h and of the log-ratios: token-mean log-probs are nats per response token."""
        return "nats/token" if self.objective.logps == "mean" else "nats"

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.records if is_number(r.get("step"))), default=0)

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` in `split`; a step logged twice (a resumed run) keeps its newest value."""
        by_step: dict[int, float] = {}
        for record in self.records:
            if record.get("split") == split and is_number(record.get("step")) and is_number(record.get(key)):
                value = float(record[key])
                by_step[int(record["step"])] = value if math.isfinite(value) else math.nan
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def points(self, split: str, x: str, y: str) -> tuple[list[int], list[float], list[float]]:
        """(steps, x values, y values) of the steps of `split` that logged both keys, in step order."""
        xs = dict(zip(*self.series(split, x), strict=True))
        steps, ys = self.series(split, y)
        both = [(step, xs[step], value) for step, value in zip(steps, ys, strict=True) if step in xs]
        return [p[0] for p in both], [p[1] for p in both], [p[2] for p in both]

    def last(self, split: str) -> dict[str, Any]:
        """The newest record of `split` (empty when there is none)."""
        return next((r for r in reversed(self.records) if r.get("split") == split), {})


def is_number(value: Any) -> bool:
    """A logged number: bool is an int in Python, but a logged flag is not a metric."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_run(run_dir: Path) -> Run:
    """Read a run directory, finished or in progress; a UserError if it is not a run or has logged nothing."""
    from psipo_cli.recipe.loader import load_recipe

    where = str(run_dir)
    if not run_dir.exists():
        raise UserError("no such run directory", where=where)
    if not run_dir.is_dir() or not (run_dir / RECIPE_FILE).is_file():
        raise UserError(f"not a psipo run directory (no {RECIPE_FILE})", where=where)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    records = [r for r in read_metrics(run_dir) if isinstance(r, dict)]
    if not records:
        raise UserError(f"no metrics logged yet ({METRICS_FILE} is missing or empty): nothing to plot", where=where)
    name = run_dir.resolve().name
    # The adapter is saved once training is over, just before the summary (and before finetune draws the plots).
    finished = any((run_dir / name).is_file() for name in (SUMMARY_FILE, ADAPTER_CONFIG))
    return Run(run_dir, name, recipe, records, finished)
