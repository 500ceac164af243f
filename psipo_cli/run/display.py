"""What a run prints, on the main process only: a banner before training, live progress, a summary after it.

Three modes: `rich` (a terminal: one live progress line with step, ETA and the latest metrics), `plain` (stdout is
not a terminal, or `--plain`: one line per log step, no carriage returns, so CI logs stay readable) and `quiet`
(only the final "run saved in" line and errors).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import TrainerCallback

from psipo_cli.models.loading import describe_reference
from psipo_cli.recipe.schema import ObjectiveSection, Recipe
from psipo_cli.run.directory import data_unit
from psipo_cli.training.layout_check import describe_layout
from psipo_cli.versions import drift_line

Mode = Literal["rich", "plain", "quiet"]

console = Console(highlight=False, soft_wrap=True)

# What the end-of-run table (and a sampling run's model card) shows, where the run logged it: preference runs log
# margins and drift; the sampling stages log the reward of their samples and eq. 6's per-sequence KL.
SUMMARY_KEYS = (
    ("loss", "loss"),
    ("reward", "mean reward r"),
    ("kl_sequence", "KL(π‖π_ref) per sequence"),
    ("margin", "mean margin h"),
    ("target", "target"),
    ("reward_accuracy", "reward accuracy"),
    ("p_hat", "mean p̂"),
    ("logratio_chosen", "Δ log π chosen"),
    ("logratio_rejected", "Δ log π rejected"),
    ("entropy", "entropy per token"),
    ("completions/mean_length", "response tokens"),
    ("clip_ratio/region_mean", "clipped fraction"),
    ("tokens_per_s", "tokens/s"),
)


def pick_mode(quiet: bool, plain: bool) -> Mode:
    if quiet:
        return "quiet"
    return "plain" if plain or not console.is_terminal else "rich"


def _is_main(trainer: Any) -> bool:
    return trainer is None or trainer.is_world_process_zero()


def banner_lines(trainer: Any, prepared: Any) -> list[str]:
    recipe = prepared.recipe
    trainable, total = trainer.model.get_nb_trainable_parameters()
    unit = data_unit(recipe)
    lines = [
        f"model      {recipe.model.name_or_path} ({recipe.model.quantization}, dtype {recipe.model.dtype})",
        f"adapter    LoRA r={recipe.adapter.r} α={recipe.adapter.alpha:g}: {trainable:,} trainable of {total:,}",
        f"objective  {_objective_text(recipe.objective)}",
        f"reference  {describe_reference(recipe)}",
        f"data       {len(prepared.train.dataset):,} train {unit}"
        + (f", {len(prepared.eval.dataset):,} eval {unit}" if prepared.eval else ""),
    ]
    if recipe.rollout is not None:
        lines.append(f"rollout    {describe_rollout(recipe)}")
    if hasattr(trainer, "forward_step"):  # a reward model scores single rows, a sampling stage TRL's: no pair layout
        lines.append(f"layout     {describe_layout(trainer.forward_step)}")
    if recipe.model.trust_remote_code:
        lines.append("trust_remote_code is ON: this model's own Python code runs")
    drift = drift_line()  # psipo relies on TRL/transformers internals (training/trl_internals.py)
    if drift:
        lines.append(drift)
    lines += [f"dropped    {count} {unit}: {reason}" for reason, count in prepared.train.dropped.items()]
    if prepared.train.truncated:
        lines.append(f"truncated  {prepared.train.truncated} pairs to data.max_length={recipe.data.max_length} tokens")
    lines.append(f"run dir    {recipe.output.dir}")
    return lines


def _objective_text(objective: ObjectiveSection) -> str:
    """`ipo τ=0.5, log-probs: mean over response tokens`; rlhf's τ weighs eq. 6's KL of whole responses."""
    if objective.loss == "rlhf":
        return f"rlhf τ={objective.tau:g}: maximise E[r] − τ·KL(π‖π_ref) (eq. 6), KL summed over each response"
    psi = f", Ψ={objective.psi}" if objective.loss in ("psipo", "online_psipo") else ""
    if objective.loss == "online_psipo" and objective.psi == "identity":
        psi += " (online IPO)"
    logps = f", log-probs: {objective.logps} over response tokens" if objective.logps else ""
    return f"{objective.loss} τ={objective.tau:g}{psi}{logps}"


def describe_rollout(recipe: Recipe) -> str:
    """The sampling stages' rollout in one line: what is sampled per prompt, how, and which reward run scores it."""
    rollout = recipe.rollout
    assert rollout is not None  # only the sampling stages have one
    if recipe.objective.loss == "rlhf":
        what = f"{rollout.responses_per_prompt} responses per prompt (RLOO, clip ε={rollout.clip_epsilon:g})"
    else:
        source = f"π^(1−β)·π_ref^β with β={rollout.mixture:g} (IPO-MD)" if rollout.mixture else "π"
        label = "soft label p̂" if rollout.label == "soft" else "label drawn as 1 with probability p̂"
        what = f"one pair per prompt from {source}, {label}"
    top_p = f", top-p {rollout.top_p:g}" if rollout.top_p < 1 else ""
    passes = f", {rollout.iterations} passes per batch of samples" if rollout.iterations > 1 else ""
    sampling = f"≤ {rollout.max_new_tokens} new tokens at temperature {rollout.temperature:g}{top_p}{passes}"
    return f"{what}; {sampling}; reward model {rollout.reward_model}"


def metrics_text(logs: dict[str, float]) -> str:
    """`loss 0.512  h 0.21→1.00  acc 0.75  5,120 tok/s` from one log record (train or eval keys); a sampling run
    adds the mean reward of its samples, their KL to the reference per sequence and the policy's entropy."""
    get = {key.removeprefix("eval_"): value for key, value in logs.items()}
    parts = []
    if "loss" in get:
        parts.append(f"loss {get['loss']:.4g}")
    if "margin" in get:
        target = f"→{get['target']:.3g}" if "target" in get else ""
        parts.append(f"h {get['margin']:.3g}{target}")
    if "reward_accuracy" in get:
        parts.append(f"acc {get['reward_accuracy']:.2f}")
    for key, label in (("reward", "reward"), ("kl_sequence", "KL"), ("entropy", "entropy")):
        if key in get:
            parts.append(f"{label} {get[key]:.3g}")
    if "tokens_per_s" in get:
        parts.append(f"{get['tokens_per_s']:,.0f} tok/s")
    return "  ".join(parts)


class Display:
    """The run's console output in one of the three modes; `callback()` is the live part for the Trainer."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._live: RichProgress | None = None

    def banner(self, trainer: Any, prepared: Any) -> None:
        if self.mode != "quiet" and _is_main(trainer):
            console.print("\n".join(banner_lines(trainer, prepared)), markup=False)

    def callback(self) -> TrainerCallback:
        if self.mode == "rich":
            self._live = RichProgress()
            return self._live
        return PlainProgress(quiet=self.mode == "quiet")

    def close(self) -> None:
        """Stop a live display even when training raised (a left-over live display garbles the terminal)."""
        if self._live is not None:
            self._live.on_train_end(None, None, None)

    def summary(self, summary: dict[str, Any]) -> None:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return
        if self.mode != "quiet":
            console.print(summary_table(summary))
            if summary.get("plots"):
                console.print(f"plots in {Path(summary['plots'][0]).parent}", markup=False)
            if summary.get("hub_url"):
                console.print(f"pushed to {summary['hub_url']}", markup=False)
        console.print(f"run saved in {summary['run_dir']}", markup=False)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"psipo run finished: {summary['steps']} steps in {summary['runtime_s']:.1f} s")
    table.add_column("metric")
    table.add_column("train (last log)", justify="right")
    table.add_column("eval", justify="right")
    for key, label in SUMMARY_KEYS:
        train, evaluation = summary["final_train"].get(key), summary["final_eval"].get(key)
        if train is None and evaluation is None:
            continue
        table.add_row(label, _fmt(train), _fmt(evaluation))
    return table


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


class PlainProgress(TrainerCallback):
    """One line per log step and per evaluation; nothing at all when quiet."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.started = time.perf_counter()
        self.first_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.quiet or not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        kind = "eval " if any(key.startswith("eval_") for key in logs) else "train"
        width = len(str(state.max_steps))
        line = f"{kind} step {state.global_step:>{width}}/{state.max_steps}  {metrics_text(logs)}"
        if kind == "train":
            line += f"  eta {self._eta(state)}"
        console.print(line, markup=False)

    def _eta(self, state: Any) -> str:
        done = state.global_step - self.first_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.started) / done * (state.max_steps - state.global_step)
        return str(timedelta(seconds=round(left)))


class RichProgress(TrainerCallback):
    """A live progress bar (step, elapsed, ETA) with the latest train metrics; evaluations print above it."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, metrics="")
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.progress is None or not logs or "train_runtime" in logs:
            return
        if any(key.startswith("eval_") for key in logs):
            self.progress.console.print(f"eval  step {state.global_step}: {metrics_text(logs)}", markup=False)
        else:
            self.progress.update(self.task, metrics=metrics_text(logs))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
