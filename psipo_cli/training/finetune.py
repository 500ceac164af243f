"""`run(recipe)`: load, validate, train, save. Everything a user can get wrong is checked before the
run directory is created, so a failed start leaves nothing behind."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import transformers
from accelerate import PartialState
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from psipo_cli.errors import RunInterrupted, RunStopped, UserError
from psipo_cli.models.loading import describe_reference, load_tokenizer
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.checkpoints import (
    CurrentIntervals,
    MarkComplete,
    StopOnSignal,
    checkpoints,
    prepare_resume,
    resume_point,
    stop_if_a_write_failed,
)
from psipo_cli.run.directory import (
    METRICS_FILE,
    MetricsFile,
    check_free_space,
    check_output_dir,
    checkpoint_bytes,
    create_run_dir,
    data_unit,
    library_versions,
    read_metrics,
    write_recipe,
    write_summary,
)
from psipo_cli.run.display import Display
from psipo_cli.run.divergence import DivergenceGuard
from psipo_cli.run.fingerprint import check_partitioning, check_resume, run_fingerprint
from psipo_cli.run.lock import acquire
from psipo_cli.run.processes import Processes, agree_on_error, stop_if_a_process_died
from psipo_cli.tools.hub import finish_run_exports
from psipo_cli.training.distributed import (
    barrier,
    single_process_rendezvous,
    uses_deepspeed,
    world,
)
from psipo_cli.training.inputs import Prepared
from psipo_cli.training.layout_check import layout_summary
from psipo_cli.training.stages import stage_for


def prepare(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Prepared:
    """All user-facing checks that need no model weights: output dir, tokenizer, data (then the stage's own step)."""
    check_output_dir(Path(recipe.output.dir), overwrite, resume)
    tokenizer = load_tokenizer(recipe.model)
    stage = stage_for(recipe.objective.loss)
    train = stage.load(recipe, tokenizer, "train")
    evaluation = stage.load(recipe, tokenizer, "eval") if recipe.data.eval else None
    return stage.prepare(Prepared(recipe, tokenizer, train, evaluation))


def build_trainer(prepared: Prepared, model: Any = None) -> Any:
    """The trainer of the recipe's stage; `model` (e.g. a reloaded PeftModel) replaces loading the recipe's."""
    # Seed before any model is built: a reward model's fresh scalar head is drawn while loading, before the
    # Trainer seeds itself, so without this it depended on whatever ran earlier in the process.
    transformers.set_seed(prepared.recipe.training.seed)
    return stage_for(prepared.recipe.objective.loss).build(prepared, model)


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
    PartialState()  # brings the process group up (gloo on CPU) before anything is loaded
    rank, processes_n = world()
    is_main = rank == 0
    prepared = prepare(recipe, overwrite, bool(resume))
    run_dir = Path(recipe.output.dir)
    checkpoint = resume_point(run_dir, resume if isinstance(resume, Path) else None) if resume else None
    fingerprint = run_fingerprint(recipe, prepared.train, processes_n)
    record = check_resume(checkpoint, fingerprint, force_resume, is_main)  # before anything is written
    deepspeed = uses_deepspeed(recipe.distributed)
    check_partitioning(checkpoint, processes_n, deepspeed)
    barrier()  # every process has checked output.dir before the main one locks and creates it
    with _no_half_made_run(run_dir, is_main), _holding(run_dir, is_main) as processes:
        if deepspeed:
            single_process_rendezvous()
        trainer = build_trainer(prepared)  # TRL's Trainer already creates output.dir
        check_free_space(run_dir, checkpoint_bytes(trainer.model))
        if is_main:
            if checkpoint is None:
                create_run_dir(run_dir, overwrite)
            else:
                prepare_resume(run_dir, checkpoint)
                record.keep_replaced_recipe(run_dir)
            write_recipe(run_dir, recipe)
        barrier()
        stage_for(recipe.objective.loss).ready(trainer)  # e.g. the layout self-check, which the banner reports
        display.banner(trainer, prepared)
        guard, stopper = _watch(trainer, recipe, record.mark(), processes, display)
        started = time.perf_counter()
        try:
            with stopper:  # only while training: Ctrl-C during loading stops at once
                result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as err:  # a failed write is `_holding`'s to report, once this has ruled out a dead process
            stop_if_a_process_died(processes, trainer.state.global_step, err)
            raise
        finally:
            display.close()
        runtime = time.perf_counter() - started
        guard.check(run_dir)
        if stopper.received is not None:
            raise RunInterrupted(_interrupted_message(run_dir, trainer, stopper.received), stopper.received)
        if prepared.eval is not None and _last_eval_step(run_dir) != trainer.state.global_step:
            trainer.evaluate()  # logged to metrics.jsonl like the periodic evaluations
        save_adapter(trainer, run_dir)
        summary = summarize(trainer, prepared, result.metrics, runtime)
        summary["bad_steps"] = guard.bad_total
        if record.forced:
            summary["forced_resume"] = record.forced
        if trainer.is_world_process_zero():
            summary["plots"] = _plots(run_dir)
            write_summary(run_dir, summary)
            summary["hub_url"] = finish_run_exports(run_dir, recipe, summary).pushed_to  # model card, hub push
    return summary


def _watch(
    trainer: Any, recipe: Recipe, mark: dict[str, Any], processes: Processes, display: Display
) -> tuple[DivergenceGuard, StopOnSignal]:
    """psipo's callbacks in place of the Trainer's tqdm and prints: metrics, sealed checkpoints, the divergence
    guard, the signal handler (which names a process that died), the display."""
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    guard = DivergenceGuard.install(trainer, recipe.training.max_bad_steps)
    stopper = StopOnSignal(on_signal=lambda: stop_if_a_process_died(processes, trainer.state.global_step))
    sealer = MarkComplete(mark, recipe.training.save_total_limit)
    run_dir = Path(recipe.output.dir)
    for callback in (MetricsFile(run_dir), sealer, CurrentIntervals(), stopper, display.callback()):
        trainer.add_callback(callback)
    return guard, stopper


@contextlib.contextmanager
def _holding(run_dir: Path, is_main: bool) -> Iterator[Processes]:
    """Hold output.dir's lock (main process) for the whole run, every process registered; a failed write anywhere
    in the run becomes its one line."""
    lock, error = None, None
    if is_main:
        try:
            lock = acquire(run_dir)
        except UserError as err:
            error = err
    agree_on_error(error)
    try:
        yield Processes.register(run_dir, lock)
    except (RunStopped, UserError):
        raise  # already the run's one line (a dead process during a save keeps its own)
    except Exception as err:  # a full disk, or a checkpoint cut short (torch.save raises RuntimeError)
        stop_if_a_write_failed(run_dir, err)
        raise
    finally:
        if lock is not None:
            lock.release()


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


def summarize(trainer: Any, prepared: Prepared, train_metrics: dict, runtime: float) -> dict[str, Any]:
    recipe = prepared.recipe
    run_dir = Path(recipe.output.dir)
    objective = recipe.objective
    unit = data_unit(recipe)  # the sampling stages train on prompts, not pairs
    summary = {
        "run_dir": str(run_dir),
        "objective": {
            "loss": objective.loss,
            "tau": objective.tau,
            "psi": objective.psi,
            "logps": objective.logps,
        },
        "reference": describe_reference(recipe),
        "reference_cache_hits": getattr(trainer, "reference_cache_hits", None),
        # None where the trainer has no pair layout: a reward model's single rows, or sampled responses (TRL's own)
        "layout": layout_summary(getattr(trainer, "forward_step", None)),
        "steps": trainer.state.global_step,
        "runtime_s": round(runtime, 2),
        f"train_{unit}": len(prepared.train.dataset),
        f"dropped_{unit}": prepared.train.dropped,
        f"truncated_{unit}": prepared.train.truncated,
        "final_train": _last(run_dir, "train"),
        "final_eval": _last(run_dir, "eval"),
        "train_loss_mean": train_metrics.get("train_loss"),
        "versions": library_versions(),
    }
    if recipe.rollout is not None:
        summary["rollout"] = recipe.rollout.model_dump()
    return summary
