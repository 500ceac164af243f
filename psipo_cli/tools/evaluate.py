"""`psipo eval`: score a finished run on held-out pairs, and optionally sample from it to estimate KL(π‖π_ref).

Eval sees exactly what training saw: the pairs go through psipo's data pipeline (`data.pairs.load_pairs`: the recipe's
column mapping, chat rendering and too_long policy), TRL's own tokenisation (`DPOTrainer._prepare_dataset`), the
trainer's forward step and collator (`forward.py`) and the objective's functions (`objectives.py`), batched by
`training.per_device_eval_batch_size` as the trainer's evaluation is. So the reported reward accuracy and mean
margin equal the trainer's last evaluation on the same data.

A run of a sampling stage (rlhf, online_psipo) is scored the same way on pairs: margins and drift from the
reference (its own training evaluations score fresh samples, not these pairs), with online ΨPO's loss on them and no
loss for rlhf, whose eq. 6 has none. On prompt-only data there are no pairs: only --generate, which for these runs
also scores each sample with the run's reward model, the mean reward and KL that eq. 6 trades off.

This module is the entry point: the run, its data and its models. The scores come from `scoring`, the samples
of `--generate` from `sampling`, and the files and the printed report from `eval_report`.

The reference is the run's: the base model with the adapter disabled, or, when the run started from an adapter
(`adapter.init_from`), that starting adapter loaded beside the trained one (TRL's "ref" copy of it during training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from psipo_cli.data.chat import ENDS_MARKED
from psipo_cli.data.pairs import PreferenceData, load_pairs, read_rows
from psipo_cli.data.prompts import load_prompts
from psipo_cli.errors import UserError
from psipo_cli.models.loading import (
    ReferenceContext,
    inference_device,
    load_policy,
    load_reference,
    load_tokenizer,
    quiet_loading,
    to_inference_device,
)
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.recipe.schema import Columns, DataSource, Recipe
from psipo_cli.run.directory import RECIPE_FILE, resolve_run
from psipo_cli.tools.eval_report import output_paths, summarize, write_outputs
from psipo_cli.tools.sampling import Prompt, RewardFn, Sampler, sample_and_score, tokenize_prompts, unique_prompts
from psipo_cli.tools.scoring import score_pairs


@dataclass
class EvalOptions:
    """What `psipo eval` was asked for, beyond the run and its overrides."""

    data: str | None = None
    out: Path | None = None
    generate: int = 0  # samples per prompt from the policy and from the reference; 0: no sampling
    prompts: int = 16
    max_new_tokens: int = 64
    overwrite: bool = False


@dataclass
class EvalData:
    """What is evaluated: preference pairs (tokenised as the trainer does) or, with --generate, prompts only."""

    data: PreferenceData  # pairs, or prompts (one `prompt` column)
    pairs: Any  # the tokenised pairs; None for prompt-only data
    prompts: list[Prompt]  # the prompts --generate samples from


def evaluate_run(target: Path, overrides: list[str] | None, options: EvalOptions) -> dict[str, Any]:
    """Evaluate the run at `target` (its directory or recipe), write pairs.jsonl and summary.json, return the summary.

    Every user-facing check (run, overrides, outputs, data, reward model) happens before the policy is loaded, and
    nothing is written until all scores are computed.
    """
    recipe, run_dir = load_run(target, overrides)
    outputs = output_paths(run_dir, options.out, options.overwrite)
    tokenizer = load_tokenizer(recipe.model)
    evaluated = load_eval_data(recipe, eval_source(recipe, options.data), tokenizer, options)
    reward = load_reward(recipe, tokenizer) if options.generate > 0 else None
    with quiet_loading(run_dir):
        model, reference = load_models(recipe, run_dir)
    scores = None
    if evaluated.pairs is not None:
        scores = score_pairs(model, reference, evaluated.pairs, recipe, tokenizer.pad_token_id)
    summary = summarize(recipe, run_dir, evaluated.data, scores, outputs)
    if options.generate > 0:
        sampler = Sampler(model, reference, tokenizer, recipe, reward)
        summary["generation"] = sample_and_score(sampler, evaluated.prompts, options.generate, options.max_new_tokens)
    write_outputs(outputs, scores, summary)
    return summary


def load_run(target: Path, overrides: list[str] | None) -> tuple[Recipe, Path]:
    """The run's resolved recipe (its recipe.yaml, absolute paths) with `overrides` applied, and the run directory."""
    recipe, run_dir = resolve_run(target)
    if overrides:
        recipe = load_recipe(run_dir / RECIPE_FILE, overrides)
    if recipe.objective.loss == "reward":
        raise UserError(
            "this run is a reward model, which has no policy or reference to evaluate; score pairs with "
            "`psipo label` instead",
            where="objective.loss",
        )
    init_from = recipe.adapter.init_from
    if init_from is not None and not (Path(init_from) / "adapter_config.json").is_file():
        raise UserError(
            "the run's reference is its starting adapter, which is no longer there (no adapter_config.json)",
            where="adapter.init_from",
        )
    return recipe, run_dir


def eval_source(recipe: Recipe, data: str | None) -> DataSource:
    """--data (a file or hub id, read with the recipe's column mapping), else the recipe's data.eval."""
    if data is not None:
        return DataSource(path=data)
    if recipe.data.eval is None:
        raise UserError("the run's recipe has no data.eval; pass --data PATH_OR_HUB_ID", where="data.eval")
    return recipe.data.eval


def load_eval_data(recipe: Recipe, source: DataSource, tokenizer: Any, options: EvalOptions) -> EvalData:
    """The pairs at `source`; prompt-only data (what a sampling stage may train on) only with --generate."""
    if holds_pairs(source, recipe.data.columns):
        data = load_pairs(source, recipe.data, tokenizer, "eval")
        pairs = tokenize_pairs(data, tokenizer, recipe.data.max_length)
        return EvalData(data, pairs, unique_prompts(pairs, options.prompts))
    if options.generate == 0:
        raise UserError(
            "holds prompts only (no chosen/rejected columns), so there are no pairs to score; pass --generate N to "
            "sample from the policy and its reference (KL, and reward for a run trained against a reward model)",
            where=source.path,
        )
    as_eval = recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval": source})})
    data = load_prompts(as_eval, tokenizer, "eval")  # rendered and deduplicated as the sampling stages read them
    return EvalData(data, None, tokenize_prompts(data.dataset["prompt"], tokenizer, options.prompts))


def holds_pairs(source: DataSource, columns: Columns) -> bool:
    """Whether the data's first row is a preference pair (a chosen or rejected column) rather than a prompt alone.

    Anything else that is not a prompt row (no rows, not an object) counts as pairs, for `load_pairs` to report.
    """
    _, rows = read_rows(source)
    first = next(iter(rows), (0, None))[1]
    return not isinstance(first, dict) or columns.chosen in first or columns.rejected in first


# --------------------------------------------------------------------------------------------------- data, models


def tokenize_pairs(pairs: PreferenceData, tokenizer: Any, max_length: int) -> Any:
    """prompt_ids/chosen_ids/rejected_ids (and p_hat) exactly as the trainer tokenises them.

    This is TRL's `DPOTrainer._prepare_dataset` itself (prompt/response split at the common prefix, keep_start
    filter), called without building a trainer: it reads nothing from the trainer but the tokenizer, and as in
    `PsipoTrainer` it appends no EOS, the data having ended every response already.
    """
    trainer_view = SimpleNamespace(_tokenizer=ENDS_MARKED)
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    dataset = DPOTrainer._prepare_dataset(trainer_view, pairs.dataset, tokenizer, args, "eval")
    keep = [c for c in ("prompt", "prompt_ids", "chosen_ids", "rejected_ids", "p_hat") if c in dataset.column_names]
    return dataset.select_columns(keep)


def load_reward(recipe: Recipe, tokenizer: Any) -> RewardFn | None:
    """The run's reward model (rollout.reward_model, checked as training checked it), to score samples; None for a
    run that trained without one."""
    if recipe.rollout is None:
        return None
    from psipo_cli.training.rollout import RewardModelScore

    with quiet_loading(Path(recipe.rollout.reward_model)):
        return RewardModelScore(recipe, tokenizer, inference_device())


def load_models(recipe: Recipe, run_dir: Path) -> tuple[Any, ReferenceContext]:
    """(policy, a context in which the same model is the reference): one set of weights, no copy."""
    model = load_policy(recipe, run_dir)
    # As DPOTrainer does: log-probs come from TRL's fused chunked LM head, never materialising full logits.
    add_fused_lm_head(model.get_base_model())
    to_inference_device(model, recipe.model)
    return model, load_reference(model, recipe)
