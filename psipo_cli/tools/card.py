"""The model card: the README.md a finished run carries, saying what was trained, on what, how, and how to use it.

No license is written (psipo cannot know it: it is the base model's and the data's), and no hub token: none is
ever read here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from psipo_cli.models.loading import describe_reference
from psipo_cli.recipe.loader import looks_local
from psipo_cli.recipe.schema import ObjectiveSection, Recipe
from psipo_cli.run.directory import SUMMARY_FILE, library_versions, read_metrics, write_atomic

CARD_FILE = "README.md"

_LOSS_TEXT = {
    "dpo": "DPO: per-pair loss −log σ(τh) (Azar et al. 2023, eq. 9), which keeps pushing h up on hard labels",
    "ipo": "IPO: per-pair loss (h − 1/(2τ))² (Azar et al. 2023, eq. 28), which regresses every margin to "
    "1/(2τ) = {target:g}",
    "psipo": "ΨPO: per-pair loss (h − (Ψ(p̂) − Ψ(1 − p̂))/(2τ))² with Ψ = {psi}, which regresses each margin to "
    "a target set by its soft label p̂ (Azar et al. 2023, ΨPO with the IPO regression)",
}


def describe_objective(objective: ObjectiveSection) -> str:
    """A paragraph saying what was optimised, with τ, Ψ and the sequence log-prob aggregation."""
    if objective.loss == "reward":
        return (
            "A Bradley–Terry reward model: per-pair loss −log σ(r(x, y_w) − r(x, y_l)) (Azar et al. 2023, eq. 5), "
            "a scalar head on the base model; its p̂ = σ(r_w − r_l) labels pairs for ΨPO (`psipo label`)."
        )
    aggregation = {"mean": "token mean", "sum": "sum"}.get(objective.logps or "", str(objective.logps))
    loss = _LOSS_TEXT.get(objective.loss, "{psi}").format(target=1 / (2 * objective.tau), psi=objective.psi)
    return (
        f"{loss}; τ = {objective.tau:g}. Here h = log[π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))] is the log-ratio "
        f"margin of a pair (chosen y_w, rejected y_l) against the reference policy π_ref, with each sequence's "
        f"log-probability the {aggregation} of its response tokens' log-probs (`objective.logps: {objective.logps}`)."
    )


def _is_reward(recipe: Recipe) -> bool:
    return recipe.objective.loss == "reward"


def _hub_datasets(recipe: Recipe) -> list[str]:
    sources = [recipe.data.train, recipe.data.eval]
    return sorted({s.path for s in sources if s is not None and not looks_local(s.path) and not Path(s.path).exists()})


def card_metadata(recipe: Recipe) -> dict[str, Any]:
    """The card's YAML front matter. No license: psipo cannot know it (it is the base model's and the data's)."""
    tags = ["psipo", "reward-model" if _is_reward(recipe) else recipe.objective.loss, "trl", "lora"]
    if recipe.model.quantization != "none":
        tags.append("qlora")
    meta: dict[str, Any] = {
        "base_model": recipe.model.name_or_path,
        "library_name": "peft",
        "pipeline_tag": "text-classification" if _is_reward(recipe) else "text-generation",
        "tags": tags,
    }
    if datasets := _hub_datasets(recipe):
        meta["datasets"] = datasets
    return meta


def _load_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _final_metrics(run_dir: Path, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The last train and eval log lines: from the summary, else from metrics.jsonl."""
    finals = {split: summary.get(f"final_{split}") or {} for split in ("train", "eval")}
    for record in read_metrics(run_dir):
        split = record.get("split")
        if split in finals and not summary.get(f"final_{split}"):
            finals[split] = {k: v for k, v in record.items() if k != "split"}
    return finals


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_table(finals: dict[str, dict[str, Any]]) -> list[str]:
    keys = [k for k in dict.fromkeys([*finals["train"], *finals["eval"]]) if k not in ("epoch",)]
    if not keys:
        return ["No metrics were logged."]
    splits = [split for split in ("train", "eval") if finals[split]]
    heads = {"train": "train (last log)", "eval": "eval (held out, last)"}
    lines = ["| metric | " + " | ".join(heads[s] for s in splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(finals[s].get(key, "")) for s in splits) + " |")
    return lines


def _data_text(recipe: Recipe) -> str:
    columns = recipe.data.columns
    if columns.label:
        labels = f"soft labels p̂ from column `{columns.label}`"
    elif columns.votes_chosen:
        labels = f"soft labels p̂ = `{columns.votes_chosen}` / `{columns.votes_total}` (annotator votes)"
    elif columns.score_chosen:
        labels = f"soft labels p̂ = σ((`{columns.score_chosen}` − `{columns.score_rejected}`) / {columns.score_scale:g})"
    else:
        labels = "hard labels: chosen preferred"
    evaluation = f"; held out: `{recipe.data.eval.path}`" if recipe.data.eval else ""
    return f"`{recipe.data.train.path}` ({labels}){evaluation}"


def _dropped_text(dropped: Any) -> str:
    if not dropped:
        return ""
    return " (dropped: " + ", ".join(f"{count} {reason}" for reason, count in dropped.items()) + ")"


def _settings_table(recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    t, a, m = recipe.training, recipe.adapter, recipe.model
    steps = t.max_steps if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
    rows = [
        ("preference data", _data_text(recipe)),
        ("pairs trained on", f"{summary.get('train_pairs', '?')}{_dropped_text(summary.get('dropped_pairs'))}"),
        ("optimizer steps", f"{summary.get('steps', steps)} (in {summary.get('runtime_s', '?')} s)"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler_type} schedule, {t.warmup_steps:g} warm-up steps"),
        ("batch", f"{t.per_device_train_batch_size} pairs per device × {t.gradient_accumulation_steps} accumulation"),
        ("max length", f"{recipe.data.max_length} tokens"),
        ("LoRA", f"r = {a.r}, alpha = {a.alpha:g}, dropout = {a.dropout:g}, modules = {a.target_modules}"),
        ("base weights", f"{m.dtype}, quantisation {m.quantization}"),
        ("precision", "bf16" if t.bf16 else "fp16" if t.fp16 else "as the weights"),
        ("seed", str(t.seed)),
    ]
    if a.init_from:
        rows.insert(6, ("starting adapter", f"`{a.init_from}`"))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _usage(recipe: Recipe, run_dir: Path) -> list[str]:
    where = recipe.output.hub_model_id or str(run_dir)
    peft_class = "AutoPeftModelForSequenceClassification" if _is_reward(recipe) else "AutoPeftModelForCausalLM"
    plain_class = "AutoModelForSequenceClassification" if _is_reward(recipe) else "AutoModelForCausalLM"
    return [
        "With peft (the adapter on top of the base model, which peft downloads or reads from "
        "`base_model_name_or_path` in `adapter_config.json`):",
        "",
        "```python",
        f"from peft import {peft_class}",
        "from transformers import AutoTokenizer",
        "",
        f'model = {peft_class}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        "Or merge the adapter into the base weights for a plain transformers model that needs no peft:",
        "",
        "```",
        f"psipo merge {run_dir} --out merged/",
        "```",
        "",
        f'then `{plain_class}.from_pretrained("merged/")`. A QLoRA run merges into the base loaded unquantised.',
    ]


def model_card(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> str:
    """The text of the run's README.md: front matter, objective, settings, final metrics, reference, versions, use."""
    front = yaml.safe_dump(card_metadata(recipe), sort_keys=False, allow_unicode=True)
    title = recipe.output.hub_model_id or run_dir.name
    intro = f"{recipe.description}\n\n" if recipe.description else ""
    versions = summary.get("versions") or library_versions()
    lines = [
        f"---\n{front}---",
        "",
        f"# {title}",
        "",
        f"{intro}A LoRA adapter for `{recipe.model.name_or_path}` trained on preference pairs with psipo, which "
        "implements DPO, IPO and ΨPO (Azar et al. 2023, [arXiv 2310.12036](https://arxiv.org/abs/2310.12036)) on "
        "TRL's DPOTrainer.",
        "",
        "## Objective",
        "",
        describe_objective(recipe.objective),
        "",
        "## Reference policy",
        "",
        summary.get("reference") or describe_reference(recipe),
        "",
        "## Training",
        "",
        *_settings_table(recipe, summary),
        "",
        "## Final metrics",
        "",
        *_metrics_table(_final_metrics(run_dir, summary)),
        "",
        "## Versions",
        "",
        ", ".join(f"{name} {ver}" for name, ver in versions.items()),
        "",
        "## How to use it",
        "",
        *_usage(recipe, run_dir),
    ]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: Path, recipe: Recipe, summary: dict[str, Any] | None = None) -> Path:
    """Write README.md (the model card) into the run directory, replacing peft's generic one; returns its path."""
    path = run_dir / CARD_FILE
    write_atomic(path, model_card(run_dir, recipe, summary if summary is not None else _load_summary(run_dir)))
    return path
