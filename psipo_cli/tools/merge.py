"""`psipo merge`: a finished run's adapter merged into its base model, saved as a plain transformers model.

The merged model and tokenizer are written to a temporary sibling of the output directory and renamed, so the
output is never half-written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psipo_cli.errors import UserError
from psipo_cli.models.loading import load_policy, load_tokenizer, quiet_loading
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.directory import check_writable, resolve_run

MERGE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MergeReport:
    out: Path
    parameters: int
    dtype: str
    auto_class: str
    dequantised: str | None  # the run's quantisation ('4bit'/'8bit') when its base was reloaded unquantised


def merge_run(target: Path, out: Path, overwrite: bool = False, dtype: str | None = None) -> MergeReport:
    """Merge a run's adapter into its base model and save a standalone transformers model (safetensors) and the
    tokenizer to `out`; `AutoModelForCausalLM.from_pretrained(out)` then needs no peft.

    A QLoRA run (model.quantization 4bit/8bit) is merged into the base loaded *unquantised*, in the recipe's dtype
    (float32 when that is 'auto' on a machine without CUDA), instead of through bitsandbytes: the adapter's update
    is added to the full-precision base weights, not to their 4/8-bit rounding, so the merged model is close to but
    not bit-identical with the quantised model plus adapter it was trained as. (Merging into quantised weights would
    re-quantise them after adding the update and round most of it away.)

    `dtype` casts the merged model (the base is loaded in it). A reward-model run merges into a sequence classifier
    (`AutoModelForSequenceClassification`). The model is written to a temporary sibling of `out` and renamed, so
    `out` is never half-written.
    """
    out = out.expanduser().resolve()
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(MERGE_DTYPES)}", where="--dtype")
    _check_merge_target(out, overwrite)
    recipe, run_dir = resolve_run(target)
    if run_dir.resolve().is_relative_to(out):
        raise UserError(f"would replace the run {run_dir} itself; choose another directory", where=f"--out {out}")
    merged, tokenizer = _merged_model(recipe, run_dir, dtype)
    _replace_dir(out, lambda tmp: _save_model(merged, tokenizer, tmp))
    return MergeReport(
        out=out,
        parameters=sum(p.numel() for p in merged.parameters()),
        dtype=str(merged.dtype).removeprefix("torch."),
        auto_class="AutoModelForSequenceClassification"
        if recipe.objective.loss == "reward"
        else "AutoModelForCausalLM",
        dequantised=None if recipe.model.quantization == "none" else recipe.model.quantization,
    )


def _check_merge_target(out: Path, overwrite: bool) -> None:
    """Fail before loading anything if `out` is unusable or holds something we were not told to replace."""
    where = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UserError("exists and is a file", where=where)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError("exists and is not empty; pass --overwrite to replace it", where=where)
        if not (out / "config.json").is_file():
            raise UserError(
                "is not empty and holds no saved model (no config.json); refusing to delete it", where=where
            )
    check_writable(out.parent, where)  # the model is written to a sibling of out, then renamed


def merge_dtype(recipe: Recipe, requested: str | None) -> str:
    """The dtype the base is loaded in for merging: --dtype, else the recipe's; 'auto' on a quantised run means the
    checkpoint's dtype on GPU and float32 on CPU (the run computed in bf16, which CPUs do slowly and coarsely)."""
    if requested is not None:
        return requested
    if recipe.model.dtype == "auto" and recipe.model.quantization != "none" and not torch.cuda.is_available():
        return "float32"
    return recipe.model.dtype


def _merged_model(recipe: Recipe, run_dir: Path, dtype: str | None) -> tuple[Any, Any]:
    """(merged model, tokenizer): the run's base loaded unquantised in `merge_dtype`, adapter applied and merged."""
    from psipo_cli.training.reward import load_reward_model

    plain = recipe.model.model_copy(update={"quantization": "none", "dtype": merge_dtype(recipe, dtype)})
    unquantised = recipe.model_copy(update={"model": plain})
    tokenizer = load_tokenizer(recipe.model)
    with quiet_loading(run_dir):
        if recipe.objective.loss == "reward":
            model = load_reward_model(unquantised, run_dir, tokenizer)
        else:
            model = load_policy(unquantised, run_dir)
    return model.merge_and_unload(), tokenizer


def _save_model(model: Any, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory))  # safetensors: transformers' only format since v5
    tokenizer.save_pretrained(str(directory))


def _replace_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a fresh sibling of `out`, then rename it to `out` (replacing what was there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed merge with the same pid
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():  # --overwrite, checked before anything was loaded
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
