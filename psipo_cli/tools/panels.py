"""What each picture of `plots` shows: its metric keys, title, axis labels and reference lines.

A panel is drawn for a run only when the run logged its data, so one table serves every stage: preference runs get
the loss, margin h against its target, reward accuracy and drift from the reference; a reward model its loss,
reward margin and accuracy; the sampling stages (rlhf, online_psipo) the mean reward of their samples, eq. 6's KL
to the reference per sequence and the one against the other (an online ΨPO run has margins and accuracy too).
No matplotlib here: the decorations receive the axes and import what they use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psipo_cli.tools.run_metrics import Run

TRAIN_STYLE = {"lw": 1.6}
EVAL_STYLE = {"ls": ":", "lw": 1.3, "marker": "o", "ms": 4.5}
POINTS_STYLE = {"lw": 1.2, "marker": "o", "ms": 3.5}  # a path through (KL, reward): each logged step is a point
STEP_LABEL = "optimizer step"


@dataclass(frozen=True)
class Series:
    """One curve of a panel: `key` in `split`, its legend label and style (colour only for a single run)."""

    key: str
    split: str
    label: str
    color: str
    style: dict[str, Any] = field(default_factory=dict)


def _common(runs: list[Run], value: Callable[[Run], str], mixed: str) -> str:
    values = {value(run) for run in runs}
    return values.pop() if len(values) == 1 else mixed


# The per-pair (or, for rlhf, per-token) loss each objective minimises, as its panel's title shows it.
LOSS_FORMULAS = {
    "dpo": "−log σ(τh)",
    "ipo": "(h − 1/(2τ))²",
    "psipo": "(h − h*)²",
    "online_psipo": "(h − h*)²",
    "reward": "−log σ(r_w − r_l)",
    "rlhf": "−min(ρA, clip(ρ, 1 ± ε)·A)",  # RLOO's clipped surrogate: ρ = π/π_old, A the leave-one-out advantage
}


def _loss_title(runs: list[Run]) -> str:
    return _common(runs, lambda run: f"loss {LOSS_FORMULAS[run.objective.loss]}", "loss")


def _loss_unit(run: Run) -> str:
    # DPO and the reward model's losses are log-likelihoods; rlhf's surrogate is an advantage, in the reward's
    # units (Bradley–Terry logits); IPO/ΨPO's are squared margins.
    if run.objective.loss == "rlhf":
        return "reward units"
    return "nats" if run.objective.loss in ("dpo", "reward") else {"nats": "nats²"}.get(run.unit, "nats²/token²")


def _margin_title(runs: list[Run]) -> str:
    if all(run.objective.loss == "reward" for run in runs):
        return "mean reward margin r_w − r_l"
    return "mean margin h"


def _h(runs: list[Run]) -> str:
    """The margin's symbol: a reward model's is the difference of its rewards."""
    return "r_w − r_l" if all(run.objective.loss == "reward" for run in runs) else "h"


@dataclass(frozen=True)
class Panel:
    """One metric: a file `<stem>.png`, and a panel of overview.png.

    Its curves run over optimizer steps, or, with `x` set, over that key's value at each step (a parametric path).
    """

    stem: str
    title: Callable[[list[Run]], str]
    ylabel: Callable[[list[Run]], str]
    series: tuple[Series, ...]
    decorate: Callable[[Any, list[Run], bool], None] = lambda ax, runs, compare: None
    x: str | None = None  # the key on the x axis; None: the optimizer step
    xlabel: str = STEP_LABEL

    def points(self, run: Run, series: Series) -> tuple[list[float], list[float]]:
        if self.x is None:
            steps, values = run.series(series.split, series.key)
            return [float(step) for step in steps], values
        return run.points(series.split, self.x, series.key)[1:]

    def has_data(self, run: Run) -> bool:
        return any(self.points(run, s)[0] for s in self.series)


def _train_eval(key: str, style: dict[str, Any] | None = None) -> tuple[Series, ...]:
    train = TRAIN_STYLE if style is None else style
    return (Series(key, "train", "train", "C0", train), Series(key, "eval", "eval", "C1", EVAL_STYLE))


def target(run: Run) -> float | None:
    """The eval target if evaluated (a fixed set, so a constant), else the mean of the train batches' targets."""
    for split in ("eval", "train"):
        values = [v for v in run.series(split, "target")[1] if math.isfinite(v)]
        if values:
            return values[-1] if split == "eval" else sum(values) / len(values)
    return None


def _target_line(ax: Any, runs: list[Run], compare: bool) -> None:
    """The margin the objective drives h to, as a dashed line; DPO with hard labels and reward models have none."""
    for i, run in enumerate(runs):
        value = target(run)
        if value is None:
            continue
        if run.objective.loss == "ipo":
            label = f"target 1/(2τ) = {value:.3g}"
        else:
            label = f"target h* (mean over pairs) = {value:.3g}"
        color = f"C{i % 10}" if compare else "black"
        ax.axhline(value, color=color, ls="--", lw=1.2, alpha=0.9, label=None if compare else label, zorder=1)


def _chance_line(ax: Any, runs: list[Run], compare: bool) -> None:
    ax.axhline(0.5, color="0.45", ls="--", lw=1.0, label="chance", zorder=1)
    ax.set_ylim(-0.03, 1.03)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])


def _zero_line(ax: Any, runs: list[Run], compare: bool) -> None:
    ax.axhline(0.0, color="0.45", lw=0.8, zorder=1)  # the reference itself


def _plain_ticks(ax: Any, runs: list[Run], compare: bool) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))  # 0.005, 5e-05: no offset text


def _path_ends(ax: Any, runs: list[Run], compare: bool) -> None:
    """Label where a single run's train path starts and ends: on a KL axis, time no longer runs left to right."""
    if compare:
        return
    steps, xs, ys = runs[0].points("train", "kl_sequence", "reward")
    for i in sorted({0, len(steps) - 1} if steps else set()):
        ax.annotate(f"step {steps[i]}", (xs[i], ys[i]), textcoords="offset points", xytext=(5, 5), fontsize=9)


def _unit(runs: list[Run]) -> str:
    return _common(runs, lambda run: run.unit, "mixed units")


# eq. 6's KL: Σ_t log π/π_ref over each sampled response, averaged over the batch's responses (a sum, so nats
# whatever objective.logps says); the estimate of one batch can dip below 0.
KL_LABEL = "KL(π‖π_ref) per sequence (nats)"
REWARD_LABEL = "mean reward r(x, y)"

PANELS = (
    Panel("loss", _loss_title, lambda runs: f"loss ({_common(runs, _loss_unit, 'mixed units')})", _train_eval("loss")),
    Panel("reward", lambda runs: "reward of the sampled responses", lambda runs: REWARD_LABEL, _train_eval("reward")),
    Panel(
        "kl",
        lambda runs: "KL to the reference",
        lambda runs: KL_LABEL,
        _train_eval("kl_sequence"),
        _zero_line,
    ),
    Panel(
        "reward_vs_kl",
        lambda runs: "reward against KL (in step order)",
        lambda runs: REWARD_LABEL,
        _train_eval("reward", POINTS_STYLE),
        _path_ends,
        x="kl_sequence",
        xlabel=KL_LABEL,
    ),
    Panel(
        "margin",
        _margin_title,
        lambda runs: f"{_h(runs)} ({_unit(runs)})",
        _train_eval("margin"),
        _target_line,
    ),
    Panel(
        "reward_accuracy",
        lambda runs: "reward accuracy",
        lambda runs: f"fraction of pairs with {_h(runs)} > 0",
        _train_eval("reward_accuracy"),
        _chance_line,
    ),
    Panel(
        "logps_drift",
        lambda runs: "drift from the reference (KL proxy)",
        lambda runs: f"log π − log π_ref ({_unit(runs)})",
        (
            Series("logratio_chosen", "train", "chosen, train", "C2", TRAIN_STYLE),
            Series("logratio_rejected", "train", "rejected, train", "C3", {**TRAIN_STYLE, "ls": "--"}),
            Series("logratio_chosen", "eval", "chosen, eval", "C2", EVAL_STYLE),
            Series("logratio_rejected", "eval", "rejected, eval", "C3", {**EVAL_STYLE, "marker": "v"}),
        ),
        _zero_line,
    ),
    Panel(
        "learning_rate",
        lambda runs: "learning rate",
        lambda runs: "learning rate",
        (Series("learning_rate", "train", "train", "C0", TRAIN_STYLE),),
        _plain_ticks,
    ),
    Panel(
        "throughput",
        lambda runs: "training throughput",
        lambda runs: "tokens / s",
        (Series("tokens_per_s", "train", "train", "C0", TRAIN_STYLE),),
    ),
)
