"""`run(recipe)`: load, validate, train, save. Everything a user can get wrong is checked before the
run directory is created, so a failed start leaves nothing behind."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import PartialState
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig

from psipo_cli.data.pairs import PreferenceData, load_pairs
from psipo_cli.errors import RunInterrupted, UserError
from psipo_cli.models.loading import (
    attach_adapter,
    describe_reference,
    disable_base_dropout,
    load_base_model,
    load_tokenizer,
)
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.checkpoints import (
    CurrentIntervals,
    MarkComplete,
    StopOnSignal,
    checkpoints,
    prepare_resume,
    resume_point,
)
from psipo_cli.run.directory import (
    METRICS_FILE,
    MetricsFile,
    check_free_space,
    check_output_dir,
    checkpoint_bytes,
    create_run_dir,
    library_versions,
    read_metrics,
    write_recipe,
    write_summary,
)
from psipo_cli.run.display import Display
from psipo_cli.run.fingerprint import check_resume, run_fingerprint
from psipo_cli.tools.hub import finish_run_exports
from psipo_cli.training.distributed import deepspeed_config, prepare_zero3_init
from psipo_cli.training.layout_check import forward_step_for, layout_summary
from psipo_cli.training.preference import PsipoTrainer
from psipo_cli.training.reference import reference_key
from psipo_cli.training.reward import build_reward_trainer, tokenize_pairs


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
    if recipe.objective.loss == "reward":  # cut to max_length here, as `psipo label` cuts them
        train = tokenize_pairs(train, tokenizer, recipe.data.max_length)
        evaluation = evaluation and tokenize_pairs(evaluation, tokenizer, recipe.data.max_length)
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
        precompute_ref_log_probs=False,  # psipo precomputes after the trainer is built (reference.py)
        beta=recipe.objective.tau,  # unused by psipo's loss; kept so TRL's model card states τ
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.training.eval_steps or recipe.training.logging_steps,
        save_strategy="steps",
        disable_dropout=False,  # TRL's would zero adapter.dropout too; modeling.disable_base_dropout spares it
        use_cpu=not torch.cuda.is_available(),
        **training,
    )


def build_trainer(prepared: Prepared, model: Any = None) -> Any:
    """The trainer for a prepared run; `model` (e.g. a reloaded PeftModel) replaces loading the recipe's."""
    recipe, tokenizer = prepared.recipe, prepared.tokenizer
    # Seed before any model is built: a reward model's fresh scalar head is drawn while loading, before the
    # Trainer seeds itself, so without this it depended on whatever ran earlier in the process.
    transformers.set_seed(recipe.training.seed)
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
    forward = forward_step_for(recipe.training.prefix_sharing, tokenizer.pad_token_id)
    trainer = PsipoTrainer(
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
    disable_base_dropout(trainer.model)
    if recipe.objective.precompute_ref_log_probs:
        splits = {"train": prepared.train, "eval": prepared.eval}
        keys = {name: reference_key(recipe, tokenizer, data.fingerprint) for name, data in splits.items() if data}
        trainer.reference_cache_hits = trainer.precompute_reference(keys)
    return trainer


def save_adapter(trainer: Any, run_dir: Path) -> None:
    """Save only the trained adapter (not TRL's frozen "ref" copy) and the tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    trainer.save_model(str(run_dir))


def run(
    recipe: Recipe,
    overwrite: bool = False,
    resume: bool | Path = False,
    display: Display | None = None,
    force_resume: bool = False,
) -> dict[str, Any]:
    """Train `recipe` into its run directory and return the summary written to summary.json.

    `resume`: True continues from output.dir's newest complete checkpoint, a Path from that checkpoint (or that
    run's newest); `force_resume` continues even if the recipe, data or model changed since that checkpoint. Under a
    multi-process launch every process runs this; only the main one writes the run dir.
    """
    display = display or Display("quiet")
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar: psipo's banner says what loaded
    state = PartialState()  # brings the process group up (gloo on CPU) before anything is loaded
    prepared = prepare(recipe, overwrite, bool(resume))
    run_dir = Path(recipe.output.dir)
    checkpoint = resume_point(run_dir, resume if isinstance(resume, Path) else None) if resume else None
    fingerprint = run_fingerprint(recipe, prepared.train, state.num_processes)
    record = check_resume(checkpoint, fingerprint, force_resume, state.is_main_process)  # before anything is written
    state.wait_for_everyone()  # every process has checked output.dir before the main one creates it
    stopper = StopOnSignal()
    with _no_half_made_run(run_dir, state.is_main_process):
        trainer = build_trainer(prepared)  # TRL's Trainer already creates output.dir
        check_free_space(run_dir, checkpoint_bytes(trainer.model))
        if state.is_main_process:
            if checkpoint is None:
                create_run_dir(run_dir, overwrite)
            else:
                prepare_resume(run_dir, checkpoint)
                record.keep_replaced_recipe(run_dir)
            write_recipe(run_dir, recipe)
        state.wait_for_everyone()
        if isinstance(trainer, PsipoTrainer):  # a reward model scores single rows: no pair layout to check
            trainer.check_layout()  # before the banner, which reports it (a no-op once the precompute ran it)
        display.banner(trainer, prepared)
        for callback in (ProgressCallback, PrinterCallback):  # psipo's display replaces the Trainer's tqdm/prints
            trainer.remove_callback(callback)
        callbacks = (MetricsFile(run_dir), MarkComplete(record.mark()), CurrentIntervals(), stopper, display.callback())
        for callback in callbacks:
            trainer.add_callback(callback)
        started = time.perf_counter()
        try:
            with stopper:  # only while training: Ctrl-C during loading stops at once
                result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            display.close()
        runtime = time.perf_counter() - started
    if stopper.received is not None:
        raise RunInterrupted(_interrupted_message(run_dir, trainer, stopper.received), stopper.received)
    if prepared.eval is not None and _last_eval_step(run_dir) != trainer.state.global_step:
        trainer.evaluate()  # logged to metrics.jsonl like the periodic evaluations
    save_adapter(trainer, run_dir)
    summary = summarize(trainer, prepared, result.metrics, runtime)
    if record.forced:
        summary["forced_resume"] = record.forced
    if trainer.is_world_process_zero():
        summary["plots"] = _plots(run_dir)
        write_summary(run_dir, summary)
        summary["hub_url"] = finish_run_exports(run_dir, recipe, summary).pushed_to  # model card, hub push
    return summary


def _plots(run_dir: Path) -> list[str]:
    """The run's PNG plots; none (not an error) when matplotlib, an optional extra, is not installed."""
    from psipo_cli.tools.plots import write_plots

    try:
        return [str(path) for path in write_plots(run_dir)]
    except UserError:
        return []


@contextlib.contextmanager
def _no_half_made_run(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Remove output.dir again if this run created it and failed before logging a single step."""
    existed = run_dir.exists()
    try:
        yield
    except BaseException:
        if is_main and not existed and not (run_dir / METRICS_FILE).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _interrupted_message(run_dir: Path, trainer: Any, signum: int) -> str:
    saved = checkpoints(run_dir)
    where = f"checkpoint saved in {saved[-1]}" if saved else "no checkpoint was saved"
    name = signal.Signals(signum).name
    return f"{name} at step {trainer.state.global_step}: {where}; continue with --resume"


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
        "reference_cache_hits": getattr(trainer, "reference_cache_hits", None),
        "layout": layout_summary(getattr(trainer, "forward_step", None)),
        "steps": trainer.state.global_step,
        "runtime_s": round(runtime, 2),
        "train_pairs": len(prepared.train.dataset),
        "dropped_pairs": prepared.train.dropped,
        "truncated_pairs": prepared.train.truncated,
        "final_train": _last(run_dir, "train"),
        "final_eval": _last(run_dir, "eval"),
        "train_loss_mean": train_metrics.get("train_loss"),
        "versions": library_versions(),
    }
