"""`run(recipe)`: load, validate, train, save. Everything a user can get wrong is checked before the
run directory is created, so a failed start leaves nothing behind."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from trl import DPOConfig

from psipo_cli.config import Recipe
from psipo_cli.data import PreferenceData, load_pairs
from psipo_cli.distributed import deepspeed_config, prepare_zero3_init
from psipo_cli.forward import ConcatenatedForward, PrefixSharedForward
from psipo_cli.modeling import attach_adapter, describe_reference, load_base_model, load_tokenizer
from psipo_cli.reward import build_reward_trainer
from psipo_cli.rundir import (
    MetricsFile,
    check_output_dir,
    create_run_dir,
    library_versions,
    read_metrics,
    write_recipe,
    write_summary,
)
from psipo_cli.trainer import PsipoTrainer


@dataclass
class Prepared:
    """Everything validated and loaded, nothing written yet."""

    recipe: Recipe
    tokenizer: Any
    train: PreferenceData
    eval: PreferenceData | None


def prepare(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Prepared:
    """All user-facing checks that need no model weights: output dir, tokenizer, data."""
    check_output_dir(Path(recipe.output.dir), overwrite, resume)
    tokenizer = load_tokenizer(recipe.model)
    train = load_pairs(recipe.data.train, recipe.data, tokenizer, "train")
    evaluation = load_pairs(recipe.data.eval, recipe.data, tokenizer, "eval") if recipe.data.eval else None
    return Prepared(recipe, tokenizer, train, evaluation)


def dpo_config(recipe: Recipe, has_eval: bool) -> DPOConfig:
    """TRL's config from the recipe: training.* by name, the rest mapped explicitly."""
    training = recipe.training.model_dump(exclude={"eval_steps", "prefix_sharing"})
    return DPOConfig(
        output_dir=recipe.output.dir,
        deepspeed=deepspeed_config(recipe.distributed),
        report_to=[r for r in recipe.output.report_to if r != "none"] or "none",
        max_length=recipe.data.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=recipe.objective.precompute_ref_log_probs,
        beta=recipe.objective.tau,  # unused by psipo's loss; kept so TRL's model card states τ
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.training.eval_steps or recipe.training.logging_steps,
        save_strategy="steps",
        disable_dropout=True,
        use_cpu=not torch.cuda.is_available(),
        **training,
    )


def build_trainer(prepared: Prepared, model: Any = None) -> Any:
    """The trainer for a prepared run; `model` (e.g. a reloaded PeftModel) replaces loading the recipe's."""
    recipe, tokenizer = prepared.recipe, prepared.tokenizer
    if recipe.objective.loss == "reward":
        evaluation = prepared.eval.dataset if prepared.eval else None
        return build_reward_trainer(recipe, tokenizer, prepared.train.dataset, evaluation, model)
    # The arguments come first: under ZeRO-3 they hold the DeepSpeed config that zero.Init reads while the
    # model is being built, so the weights are sharded as they load.
    args = dpo_config(recipe, prepared.eval is not None)
    prepare_zero3_init(args)
    peft_config = None
    if model is None:
        model, peft_config = attach_adapter(load_base_model(recipe), recipe.adapter)
    forward = PrefixSharedForward() if recipe.training.prefix_sharing else ConcatenatedForward()
    return PsipoTrainer(
        model=model,
        args=args,
        data_collator=forward.collator(tokenizer.pad_token_id, recipe.data.max_length),
        train_dataset=prepared.train.dataset,
        eval_dataset=prepared.eval.dataset if prepared.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        objective=recipe.objective,
        forward_step=forward,
    )


def save_adapter(trainer: Any, run_dir: Path) -> None:
    """Save only the trained adapter (not TRL's frozen "ref" copy) and the tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    trainer.save_model(str(run_dir))


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False, on_start: Any = None) -> dict[str, Any]:
    """Train `recipe` into its run directory and return the summary written to summary.json.

    Under a multi-process launch every process runs this; only the main one writes the run directory.
    """
    state = PartialState()  # brings the process group up (gloo on CPU) before anything is loaded
    prepared = prepare(recipe, overwrite, resume)
    run_dir = Path(recipe.output.dir)
    existed = run_dir.exists()
    state.wait_for_everyone()  # every process has checked output.dir before the main one creates it
    trainer = build_trainer(prepared)
    try:
        if state.is_main_process:
            if not resume:
                create_run_dir(run_dir, overwrite)
            write_recipe(run_dir, recipe)
        state.wait_for_everyone()
        if on_start is not None:
            on_start(trainer, prepared)
        trainer.add_callback(MetricsFile(run_dir))
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        runtime = time.perf_counter() - started
    except BaseException:
        if state.is_main_process and not existed and trainer.state.global_step == 0:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no half-made run
        raise
    if prepared.eval is not None and _last_eval_step(run_dir) != trainer.state.global_step:
        trainer.evaluate()  # logged to metrics.jsonl like the periodic evaluations
    save_adapter(trainer, run_dir)
    summary = summarize(trainer, prepared, result.metrics, runtime)
    if trainer.is_world_process_zero():
        write_summary(run_dir, summary)
    return summary


def _last(run_dir: Path, split: str) -> dict[str, Any]:
    logs = [m for m in read_metrics(run_dir) if m["split"] == split]
    return {k: v for k, v in logs[-1].items() if k != "split"} if logs else {}


def _last_eval_step(run_dir: Path) -> int | None:
    return _last(run_dir, "eval").get("step")


def summarize(trainer: PsipoTrainer, prepared: Prepared, train_metrics: dict, runtime: float) -> dict[str, Any]:
    run_dir = Path(prepared.recipe.output.dir)
    objective = prepared.recipe.objective
    return {
        "run_dir": str(run_dir),
        "objective": {
            "loss": objective.loss,
            "tau": objective.tau,
            "psi": objective.psi,
            "logps": objective.logps,
        },
        "reference": describe_reference(prepared.recipe),
        "steps": trainer.state.global_step,
        "runtime_s": round(runtime, 2),
        "train_pairs": len(prepared.train.dataset),
        "dropped_pairs": prepared.train.dropped,
        "final_train": _last(run_dir, "train"),
        "final_eval": _last(run_dir, "eval"),
        "train_loss_mean": train_metrics.get("train_loss"),
        "versions": library_versions(),
    }
