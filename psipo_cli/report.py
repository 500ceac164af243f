"""What a run prints: a banner before training and a summary after it (main process only)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from psipo_cli.modeling import describe_reference

console = Console(highlight=False, soft_wrap=True)

SUMMARY_KEYS = (
    ("loss", "loss"),
    ("margin", "mean margin h"),
    ("target", "target"),
    ("reward_accuracy", "reward accuracy"),
    ("logratio_chosen", "Δ log π chosen"),
    ("logratio_rejected", "Δ log π rejected"),
    ("tokens_per_s", "tokens/s"),
)


def _is_main(trainer: Any) -> bool:
    return trainer is None or trainer.is_world_process_zero()


def print_banner(trainer: Any, prepared: Any) -> None:
    if not _is_main(trainer):
        return
    recipe = prepared.recipe
    trainable, total = trainer.model.get_nb_trainable_parameters()
    objective = recipe.objective
    psi = f", Ψ={objective.psi}" if objective.loss == "psipo" else ""
    logps = f", log-probs: {objective.logps} over response tokens" if objective.logps else ""
    lines = [
        f"model      {recipe.model.name_or_path} ({recipe.model.quantization}, dtype {recipe.model.dtype})",
        f"adapter    LoRA r={recipe.adapter.r} α={recipe.adapter.alpha:g}: {trainable:,} trainable of {total:,}",
        f"objective  {objective.loss} τ={objective.tau:g}{psi}{logps}",
        f"reference  {describe_reference(recipe)}",
        f"data       {len(prepared.train.dataset):,} train pairs"
        + (f", {len(prepared.eval.dataset):,} eval pairs" if prepared.eval else ""),
    ]
    if recipe.model.trust_remote_code:
        lines.append("[bold yellow]trust_remote_code is ON: this model's own Python code runs[/bold yellow]")
    lines += [f"dropped    {count} pairs: {reason}" for reason, count in prepared.train.dropped.items()]
    lines.append(f"run dir    {recipe.output.dir}")
    console.print("\n".join(lines))


def print_summary(summary: dict[str, Any]) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    table = Table(title=f"psipo run finished: {summary['steps']} steps in {summary['runtime_s']:.1f} s")
    table.add_column("metric")
    table.add_column("train (last log)", justify="right")
    table.add_column("eval", justify="right")
    for key, label in SUMMARY_KEYS:
        train, evaluation = summary["final_train"].get(key), summary["final_eval"].get(key)
        if train is None and evaluation is None:
            continue
        table.add_row(label, _fmt(train), _fmt(evaluation))
    console.print(table)
    console.print(f"run saved in {summary['run_dir']}")


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"
