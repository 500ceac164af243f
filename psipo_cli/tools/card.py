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
from psipo_cli.recipe.schema import SAMPLING_LOSSES, Recipe
from psipo_cli.run.directory import SUMMARY_FILE, data_unit, library_versions, read_metrics
from psipo_cli.run.display import SUMMARY_KEYS, describe_rollout
from psipo_cli.run.files import write_atomic

CARD_FILE = "README.md"

_LOSS_TEXT = {
    "dpo": "DPO: per-pair loss −log σ(τh) (Azar et al. 2023, eq. 9), which keeps pushing h up on hard labels",
    "ipo": "IPO: per-pair loss (h − 1/(2τ))² (Azar et al. 2023, eq. 28), which regresses every margin to "
    "1/(2τ) = {target:g}",
    "psipo": "ΨPO: per-pair loss (h − (Ψ(p̂) − Ψ(1 − p̂))/(2τ))² with Ψ = {psi}, which regresses each margin to "
    "a target set by its soft label p̂ (Azar et al. 2023, ΨPO with the IPO regression)",
}


AZAR = "Azar et al. 2023, [arXiv 2310.12036](https://arxiv.org/abs/2310.12036)"
RLOO = "Ahmadian et al. 2024, [arXiv 2402.14740](https://arxiv.org/abs/2402.14740)"
ONLINE_IPO = "Calandriello et al. 2024, [arXiv 2403.08635](https://arxiv.org/abs/2403.08635)"


def describe_objective(recipe: Recipe) -> str:
    """A paragraph saying what was optimised, with τ, Ψ and the sequence log-prob aggregation (and, for the
    sampling stages, how responses were sampled and scored)."""
    objective = recipe.objective
    if objective.loss == "reward":
        return (
            "A Bradley–Terry reward model: per-pair loss −log σ(r(x, y_w) − r(x, y_l)) (Azar et al. 2023, eq. 5), "
            "a scalar head on the base model; its p̂ = σ(r_w − r_l) labels pairs for ΨPO (`psipo label`)."
        )
    if objective.loss == "rlhf":
        return _rlhf_text(recipe)
    if objective.loss == "online_psipo":
        return f"{_online_text(recipe)} {_margin_text(recipe, 'y', 'y′')}"
    loss = _LOSS_TEXT[objective.loss].format(target=1 / (2 * objective.tau), psi=objective.psi)
    return f"{loss}; τ = {objective.tau:g}. {_margin_text(recipe, 'y_w', 'y_l')}"


def _margin_text(recipe: Recipe, first: str, second: str) -> str:
    logps = recipe.objective.logps
    aggregation = {"mean": "token mean", "sum": "sum"}.get(logps or "", str(logps))
    # An online run logs each pair's margin and target oriented so that its preferred sample comes first.
    pair = "(chosen y_w, rejected y_l)" if first == "y_w" else "(logged with the preferred sample first)"
    return (
        f"Here h = log[π({first}) π_ref({second}) / (π({second}) π_ref({first}))] is the log-ratio margin of a pair "
        f"{pair} against the reference policy π_ref, with each sequence's log-probability the {aggregation} of its "
        f"response tokens' log-probs (`objective.logps: {logps}`)."
    )


def _rlhf_text(recipe: Recipe) -> str:
    tau, rollout = recipe.objective.tau, recipe.rollout
    assert rollout is not None  # the schema requires it for rlhf
    passes = "one pass" if rollout.iterations == 1 else f"{rollout.iterations} passes"
    return (
        f"RLHF ({AZAR}, eq. 6): maximise E_x E_{{y∼π(·|x)}}[r(x, y)] − τ·KL(π ‖ π_ref) with τ = {tau:g}, the "
        "coefficient of the KL of each whole sampled response, Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t) (a sum "
        f"over its tokens, not a token mean; TRL's β), which is subtracted from that response's reward. It is "
        f"optimised with RLOO ({RLOO}) on TRL's RLOOTrainer: k = {rollout.responses_per_prompt} responses are "
        "sampled per prompt, each one's advantage is its KL-penalised reward minus the mean of the other k − 1 "
        "(the leave-one-out baseline, in place of PPO's learned critic), and the policy follows PPO's clipped "
        f"surrogate with ε = {rollout.clip_epsilon:g}, {passes} over each batch of samples. r is the Bradley–Terry "
        f"reward model of the psipo run `{rollout.reward_model}`, frozen."
    )


def _online_text(recipe: Recipe) -> str:
    objective, rollout = recipe.objective, recipe.rollout
    assert rollout is not None  # the schema requires it for online_psipo
    identity = objective.psi == "identity"
    name = "Online IPO" if identity else f"Online ΨPO with Ψ = {objective.psi}"
    source = "the policy π"
    if rollout.mixture:  # IPO-MD: sampling from the mixture, as Nash-MD does
        name = "Online IPO-MD" if identity else f"{name}, sampled as IPO-MD"
        source = f"the geometric mixture π^(1−β)·π_ref^β of the policy and the reference, β = {rollout.mixture:g}"
    target = "(p̂ − ½)/τ" if identity else "(Ψ(p̂) − Ψ(1 − p̂))/(2τ)"
    label = (
        "used as a soft label"
        if rollout.label == "soft"
        else "replaced by a draw of 1 (y preferred) with that probability, as from one annotator"
    )
    return (
        f"{name} ({ONLINE_IPO}; ΨPO of {AZAR}): each step two responses y, y′ are sampled per prompt from {source}; "
        f"the Bradley–Terry reward model of the psipo run `{rollout.reward_model}` labels the pair "
        f"p̂ = σ(r(y) − r(y′)) (eq. 4), {label}; and the per-pair loss (h − {target})² regresses the margin to that "
        f"target; τ = {objective.tau:g}."
    )


def _is_reward(recipe: Recipe) -> bool:
    return recipe.objective.loss == "reward"


def _hub_datasets(recipe: Recipe) -> list[str]:
    sources = [recipe.data.train, recipe.data.eval]
    return sorted({s.path for s in sources if s is not None and not looks_local(s.path) and not Path(s.path).exists()})


def _objective_tags(recipe: Recipe) -> list[str]:
    """Hub tags naming what was trained: the objective, or the reward model / the sampling algorithm."""
    loss, rollout = recipe.objective.loss, recipe.rollout
    if loss == "reward":
        return ["reward-model"]
    if loss == "rlhf":
        return ["rlhf", "rloo"]
    if loss == "online_psipo":
        tags = ["online-ipo" if recipe.objective.psi == "identity" else "online-psipo"]
        return tags + (["ipo-md"] if rollout is not None and rollout.mixture else [])
    return [loss]


def card_metadata(recipe: Recipe) -> dict[str, Any]:
    """The card's YAML front matter. No license: psipo cannot know it (it is the base model's and the data's)."""
    tags = ["psipo", *_objective_tags(recipe), "trl", "lora"]
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


def _metrics_table(recipe: Recipe, finals: dict[str, dict[str, Any]]) -> list[str]:
    splits = [split for split in ("train", "eval") if finals[split]]
    rows = _sampling_rows(recipe, finals) if recipe.objective.loss in SAMPLING_LOSSES else _logged_rows(finals)
    if not rows:
        return ["No metrics were logged."]
    heads = {"train": "train (last log)", "eval": "eval (held out, last)"}
    lines = ["| metric | " + " | ".join(heads[s] for s in splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(s, "")) for s in splits) + " |")
    return lines


def _logged_rows(finals: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every key the last logs hold, by its logged name."""
    keys = [k for k in dict.fromkeys([*finals["train"], *finals["eval"]]) if k not in ("epoch",)]
    return [(key, {split: finals[split].get(key, "") for split in finals}) for key in keys]


def _sampling_rows(recipe: Recipe, finals: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """A sampling run's headline metrics (TRL logs dozens): those of the end-of-run table, named and keyed, and
    for rlhf the value of eq. 6 itself, mean reward − τ · KL per sequence."""
    rows = [
        (f"{label} (`{key}`)", {split: finals[split].get(key, "") for split in finals})
        for key, label in SUMMARY_KEYS
        if any(key in finals[split] for split in finals)
    ]
    if recipe.objective.loss == "rlhf":
        tau = recipe.objective.tau
        objective = {
            split: record["reward"] - tau * record["kl_sequence"]
            for split, record in finals.items()
            if "reward" in record and "kl_sequence" in record
        }
        if objective:
            rows.insert(0, (f"E[r] − τ·KL, τ = {tau:g} (eq. 6)", objective))
    return rows


def _data_text(recipe: Recipe) -> str:
    evaluation = f"; held out: `{recipe.data.eval.path}`" if recipe.data.eval else ""
    if recipe.objective.loss in SAMPLING_LOSSES:  # only the prompts are read: responses and labels are sampled
        return f"`{recipe.data.train.path}` (its prompts; the responses are sampled and scored){evaluation}"
    columns = recipe.data.columns
    if columns.label:
        labels = f"soft labels p̂ from column `{columns.label}`"
    elif columns.votes_chosen:
        labels = f"soft labels p̂ = `{columns.votes_chosen}` / `{columns.votes_total}` (annotator votes)"
    elif columns.score_chosen:
        labels = f"soft labels p̂ = σ((`{columns.score_chosen}` − `{columns.score_rejected}`) / {columns.score_scale:g})"
    else:
        labels = "hard labels: chosen preferred"
    return f"`{recipe.data.train.path}` ({labels}){evaluation}"


def _dropped_text(dropped: Any) -> str:
    if not dropped:
        return ""
    return " (dropped: " + ", ".join(f"{count} {reason}" for reason, count in dropped.items()) + ")"


def _settings_table(recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    t, a, m = recipe.training, recipe.adapter, recipe.model
    steps = t.max_steps if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
    unit = data_unit(recipe)
    trained_on = f"{summary.get(f'train_{unit}', '?')}{_dropped_text(summary.get(f'dropped_{unit}'))}"
    rows = [
        ("preference data" if unit == "pairs" else "prompts", _data_text(recipe)),
        (f"{unit} trained on", trained_on),
        ("optimizer steps", f"{summary.get('steps', steps)} (in {summary.get('runtime_s', '?')} s)"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler_type} schedule, {t.warmup_steps:g} warm-up steps"),
        ("batch", _batch_text(recipe)),
        ("max length", f"{recipe.data.max_length} tokens"),
        ("LoRA", f"r = {a.r}, alpha = {a.alpha:g}, dropout = {a.dropout:g}, modules = {a.target_modules}"),
        ("base weights", f"{m.dtype}, quantisation {m.quantization}"),
        ("precision", "bf16" if t.bf16 else "fp16" if t.fp16 else "as the weights"),
        ("seed", str(t.seed)),
    ]
    if recipe.rollout is not None:
        rows.insert(2, ("sampling", describe_rollout(recipe)))
    if a.init_from:
        rows.insert(6, ("starting adapter", f"`{a.init_from}`"))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _batch_text(recipe: Recipe) -> str:
    t = recipe.training
    if recipe.rollout is None:
        return f"{t.per_device_train_batch_size} pairs per device × {t.gradient_accumulation_steps} accumulation"
    return (
        f"{t.per_device_train_batch_size} prompts × {recipe.rollout.responses_per_prompt} responses per device × "
        f"{t.gradient_accumulation_steps} accumulation"
    )


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


def _trained_how(recipe: Recipe) -> str:
    """The card's opening, after the adapter's base: how psipo trained it."""
    if recipe.objective.loss == "rlhf":
        return (
            "trained with psipo's RLHF stage on TRL's RLOOTrainer: it samples responses to prompts and is rewarded "
            f"by a psipo reward model, kept close to its reference by a KL penalty ({AZAR}, eq. 6)."
        )
    if recipe.objective.loss == "online_psipo":
        return (
            "trained with psipo's online ΨPO stage on TRL's RLOOTrainer: it samples pairs of responses to prompts "
            f"and learns from a psipo reward model's preferences between them ({ONLINE_IPO})."
        )
    return f"trained on preference pairs with psipo, which implements DPO, IPO and ΨPO ({AZAR}) on TRL's DPOTrainer."


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
        f"{intro}A LoRA adapter for `{recipe.model.name_or_path}` {_trained_how(recipe)}",
        "",
        "## Objective",
        "",
        describe_objective(recipe),
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
        *_metrics_table(recipe, _final_metrics(run_dir, summary)),
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
