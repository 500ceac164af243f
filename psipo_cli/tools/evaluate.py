"""`psipo eval`: score a finished run on held-out pairs, and optionally sample from it to estimate KL(π‖π_ref).

Eval sees exactly what training saw: the pairs go through psipo's data pipeline (`data.load_pairs`: the recipe's
column mapping, chat rendering and too_long policy), TRL's own tokenisation (`DPOTrainer._prepare_dataset`), the
trainer's forward step and collator (`forward.py`) and the objective's functions (`objectives.py`), batched by
`training.per_device_eval_batch_size` as the trainer's evaluation is. So the reported reward accuracy and mean
margin equal the trainer's last evaluation on the same data.

The reference is the run's: the base model with the adapter disabled, or, when the run started from an adapter
(`adapter.init_from`), that starting adapter loaded beside the trained one (TRL's "ref" copy of it during training).
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head, use_adapter

from psipo_cli.data.chat import ENDS_MARKED, stop_token_ids
from psipo_cli.data.pairs import PreferenceData, load_pairs
from psipo_cli.errors import UserError
from psipo_cli.models.loading import load_policy, load_tokenizer, to_inference_device
from psipo_cli.objectives import margin, pair_losses, sequence_logps
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.recipe.schema import DataSource, Recipe
from psipo_cli.run.directory import RECIPE_FILE, resolve_run, write_atomic, write_jsonl_atomic
from psipo_cli.training.forward import ConcatenatedForward
from psipo_cli.training.layout_check import forward_step_for

EVAL_DIR = "eval"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "summary.json"


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
class Outputs:
    pairs: Path
    summary: Path


@dataclass
class PairScores:
    """Per-pair results, aggregated as `objective.logps` says (sum or token mean), all (n,)."""

    margin: Tensor
    loss: Tensor
    target: Tensor | None
    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    p_hat: Tensor | None


# --------------------------------------------------------------------------------------------------- entry point


def evaluate_run(target: Path, overrides: list[str] | None, options: EvalOptions) -> dict[str, Any]:
    """Evaluate the run at `target` (its directory or recipe), write pairs.jsonl and summary.json, return the summary.

    Every user-facing check (run, overrides, outputs, data) happens before the model is loaded, and nothing is
    written until all scores are computed.
    """
    recipe, run_dir = load_run(target, overrides)
    outputs = output_paths(run_dir, options.out, options.overwrite)
    source = eval_source(recipe, options.data)
    tokenizer = load_tokenizer(recipe.model)
    pairs = load_pairs(source, recipe.data, tokenizer, "eval")
    dataset = tokenize_pairs(pairs, tokenizer, recipe.data.max_length)
    model, reference = load_models(recipe, run_dir)
    scores = score_pairs(model, reference, dataset, recipe, tokenizer.pad_token_id)
    summary = summarize(recipe, run_dir, pairs, scores, outputs)
    if options.generate > 0:
        prompts = unique_prompts(dataset, options.prompts)
        summary["generation"] = sample_and_score(model, reference, prompts, tokenizer, recipe, options)
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


def output_paths(run_dir: Path, out: Path | None, overwrite: bool) -> Outputs:
    """pairs.jsonl and summary.json: RUN_DIR/eval/ by default; with --out X.jsonl, X.jsonl and X.summary.json."""
    if out is None:
        outputs = Outputs(run_dir / EVAL_DIR / PAIRS_FILE, run_dir / EVAL_DIR / SUMMARY_FILE)
    else:
        if out.suffix != ".jsonl":
            raise UserError("per-pair results are written as JSON lines: use a .jsonl name", where="--out")
        if not out.parent.is_dir():
            raise UserError(f"the directory of {out} does not exist", where="--out")
        outputs = Outputs(out, out.with_name(f"{out.stem}.summary.json"))
    for path in (outputs.pairs, outputs.summary):
        if path.exists() and not overwrite:
            raise UserError("exists; pass --overwrite to replace it", where=str(path))
    return outputs


def eval_source(recipe: Recipe, data: str | None) -> DataSource:
    """--data (a file or hub id, read with the recipe's column mapping), else the recipe's data.eval."""
    if data is not None:
        return DataSource(path=data)
    if recipe.data.eval is None:
        raise UserError("the run's recipe has no data.eval; pass --data PATH_OR_HUB_ID", where="data.eval")
    return recipe.data.eval


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


ReferenceContext = Callable[[], contextlib.AbstractContextManager]


def load_models(recipe: Recipe, run_dir: Path) -> tuple[Any, ReferenceContext]:
    """(policy, a context in which the same model is the reference): one set of weights, no copy."""
    model = load_policy(recipe, run_dir)
    # As DPOTrainer does: log-probs come from TRL's fused chunked LM head, never materialising full logits.
    add_fused_lm_head(model.get_base_model())
    to_inference_device(model, recipe.model)
    ref_adapter = _load_reference_adapter(model, recipe) if recipe.adapter.init_from else None
    return model, lambda: use_adapter(model, ref_adapter)


def _load_reference_adapter(model: Any, recipe: Recipe) -> str:
    """Load the run's starting adapter as "ref" (what TRL's frozen "ref" copy held during training)."""
    path = Path(recipe.adapter.init_from or "")
    try:
        model.load_adapter(str(path), adapter_name="ref")
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"cannot load the starting adapter ({str(err).splitlines()[0]})", where="adapter.init_from"
        ) from None
    model.set_adapter("default")
    return "ref"


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: Any, recipe: Recipe) -> contextlib.AbstractContextManager:
    """The trainer's mixed precision: bf16/fp16 autocast when the recipe trained with it."""
    dtype = torch.bfloat16 if recipe.training.bf16 else torch.float16 if recipe.training.fp16 else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(model).type, dtype=dtype)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------- pair scores


def _batches(dataset: Any, size: int) -> Iterator[list[dict[str, Any]]]:
    """In order, as the trainer's evaluation loop reads them (no shuffling, last batch short)."""
    for start in range(0, len(dataset), size):
        yield [dataset[i] for i in range(start, min(start + size, len(dataset)))]


@torch.no_grad()
def score_pairs(model: Any, reference: ReferenceContext, dataset: Any, recipe: Recipe, pad_token_id: int) -> PairScores:
    """Policy and reference log-probs of every pair through the trainer's forward step, then the objective."""
    forward = forward_step_for(recipe.training.prefix_sharing, pad_token_id)
    collate = forward.collator(pad_token_id, recipe.data.max_length)
    how = recipe.objective.logps or "sum"
    parts: dict[str, list[Tensor]] = {}
    for examples in _batches(dataset, recipe.training.per_device_eval_batch_size):
        inputs = _to(collate([{k: v for k, v in e.items() if k != "prompt"} for e in examples]), _device(model))
        with _autocast(model, recipe):
            policy = forward(model, inputs)
            with reference():
                ref = forward(model, inputs)
        n_c, n_r = policy.chosen_tokens, policy.rejected_tokens
        values = {  # the same aggregation, in fp32, as PsipoTrainer._aggregate
            "policy_chosen": sequence_logps(policy.chosen.float(), n_c, how),
            "policy_rejected": sequence_logps(policy.rejected.float(), n_r, how),
            "ref_chosen": sequence_logps(ref.chosen.float(), n_c, how),
            "ref_rejected": sequence_logps(ref.rejected.float(), n_r, how),
            "chosen_tokens": n_c,
            "rejected_tokens": n_r,
        }
        if "p_hat" in inputs:
            values["p_hat"] = inputs["p_hat"]
        for key, value in values.items():
            parts.setdefault(key, []).append(value.detach().cpu())
    return _objective(recipe, {key: torch.cat(value) for key, value in parts.items()})


def _objective(recipe: Recipe, logps: dict[str, Tensor]) -> PairScores:
    """Margins, losses and targets from `objectives`, the functions the trainer's loss step calls."""
    objective = recipe.objective
    h = margin(logps["policy_chosen"], logps["policy_rejected"], logps["ref_chosen"], logps["ref_rejected"])
    p_hat = logps.get("p_hat")
    losses, target = pair_losses(
        objective.loss, h, objective.tau, p_hat=p_hat, psi=objective.psi, label_eps=objective.label_eps
    )
    return PairScores(
        margin=h,
        loss=losses,
        target=target,
        policy_chosen=logps["policy_chosen"],
        policy_rejected=logps["policy_rejected"],
        ref_chosen=logps["ref_chosen"],
        ref_rejected=logps["ref_rejected"],
        chosen_tokens=logps["chosen_tokens"],
        rejected_tokens=logps["rejected_tokens"],
        p_hat=p_hat,
    )


def pair_records(scores: PairScores) -> list[dict[str, Any]]:
    """One JSON object per pair; `pair` is its 0-based position among the evaluated pairs."""
    records = []
    for i in range(scores.margin.numel()):
        record: dict[str, Any] = {
            "pair": i,
            "margin": scores.margin[i].item(),
            "loss": scores.loss[i].item(),
            "policy_chosen": scores.policy_chosen[i].item(),
            "policy_rejected": scores.policy_rejected[i].item(),
            "ref_chosen": scores.ref_chosen[i].item(),
            "ref_rejected": scores.ref_rejected[i].item(),
            "chosen_tokens": int(scores.chosen_tokens[i]),
            "rejected_tokens": int(scores.rejected_tokens[i]),
        }
        if scores.target is not None:
            record["target"] = scores.target[i].item()
        if scores.p_hat is not None:
            record["p_hat"] = scores.p_hat[i].item()
        records.append(record)
    return records


def _mean(x: Tensor) -> float:
    return x.double().mean().item()


def summarize(recipe: Recipe, run_dir: Path, pairs: PreferenceData, scores: PairScores, outputs: Outputs) -> dict:
    """The summary: reward accuracy, margin distribution, target, loss and drift from the reference."""
    h = scores.margin.double()
    p10, p50, p90 = torch.quantile(h, torch.tensor([0.1, 0.5, 0.9], dtype=h.dtype)).tolist()
    objective = recipe.objective
    return {
        "run_dir": str(run_dir),
        "data": pairs.source,
        "pairs": h.numel(),
        "dropped_pairs": pairs.dropped,
        "objective": {"loss": objective.loss, "tau": objective.tau, "psi": objective.psi, "logps": objective.logps},
        "reference": reference_description(recipe),
        "reward_accuracy": (h > 0).double().mean().item(),
        "margin": {
            "mean": h.mean().item(),
            "std": h.std().item() if h.numel() > 1 else 0.0,  # sample standard deviation (n − 1)
            "p10": p10,
            "p50": p50,
            "p90": p90,
        },
        "target": None if scores.target is None else _mean(scores.target),
        "loss": _mean(scores.loss),
        "logps_chosen": _mean(scores.policy_chosen),
        "logps_rejected": _mean(scores.policy_rejected),
        "logratio_chosen": _mean(scores.policy_chosen - scores.ref_chosen),  # drift from the reference: a KL proxy
        "logratio_rejected": _mean(scores.policy_rejected - scores.ref_rejected),
        "pairs_file": str(outputs.pairs),
        "generation": None,
    }


def reference_description(recipe: Recipe) -> str:
    if recipe.adapter.init_from:
        return f"starting adapter {recipe.adapter.init_from}"
    return f"base model {recipe.model.name_or_path} with the adapter disabled"


# --------------------------------------------------------------------------------------------------- sampling


def unique_prompts(dataset: Any, limit: int) -> list[list[int]]:
    """Token ids of the first `limit` distinct prompts, tokenised (and chat-rendered) as in training."""
    seen: set[str] = set()
    prompts: list[list[int]] = []
    for text, ids in zip(dataset["prompt"], dataset["prompt_ids"], strict=True):
        if text not in seen:
            seen.add(text)
            prompts.append(ids)
        if len(prompts) == limit:
            break
    return prompts


def sampling_config(tokenizer: Any, max_new_tokens: int) -> Any:
    """Plain ancestral sampling from π: every logits processor a model's generation_config may set is neutralised.

    transformers fills any field left unset from the model's generation_config and then from its own defaults
    (top_k=50): the KL estimate needs samples from π itself, so each is given explicitly.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )


def _responses(sequences: Tensor, prompt_length: int, stop_ids: list[int]) -> list[list[int]]:
    """Each sampled row's response tokens, up to and including its first stop token (generate pads after it)."""
    out = []
    for row in sequences[:, prompt_length:].tolist():
        ends = [i for i, token in enumerate(row) if token in stop_ids]
        out.append(row[: ends[0] + 1] if ends else row)
    return out


def _score_responses(
    model: Any,
    reference: ReferenceContext,
    prompt: list[int],
    responses: list[list[int]],
    recipe: Recipe,
    pad_token_id: int,
) -> tuple[Tensor, Tensor]:
    """Summed log π(y|x) and log π_ref(y|x) of each response, through the trainer's concatenated forward step."""
    forward = ConcatenatedForward()
    examples = [{"prompt_ids": prompt, "chosen_ids": r, "rejected_ids": r} for r in responses]
    inputs = _to(forward.collator(pad_token_id, None)(examples), _device(model))  # no truncation: every token
    with _autocast(model, recipe):
        policy = forward(model, inputs).chosen.float()
        with reference():
            ref = forward(model, inputs).chosen.float()
    return policy.cpu(), ref.cpu()


@dataclass
class Samples:
    """What one policy's samples gave: response lengths, whether each ended in EOS, log π(y|x) − log π_ref(y|x)."""

    lengths: list[int]
    ended: list[bool]
    log_ratios: list[float]


def _sample(
    model: Any,
    reference: ReferenceContext,
    from_reference: bool,
    prompts: list[list[int]],
    tokenizer: Any,
    recipe: Recipe,
    options: EvalOptions,
) -> Samples:
    """`options.generate` samples per prompt from π (or π_ref), each scored under both."""
    config = sampling_config(tokenizer, options.max_new_tokens)
    stop_ids = config.eos_token_id
    samples = Samples([], [], [])
    for prompt in prompts:
        input_ids = torch.tensor([prompt] * options.generate, device=_device(model))
        with reference() if from_reference else contextlib.nullcontext(), _autocast(model, recipe):
            sequences = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
        responses = _responses(sequences, len(prompt), stop_ids)
        logp, logp_ref = _score_responses(model, reference, prompt, responses, recipe, tokenizer.pad_token_id)
        samples.lengths += [len(r) for r in responses]
        samples.ended += [bool(r) and r[-1] in stop_ids for r in responses]
        samples.log_ratios += (logp - logp_ref).tolist()
    return samples


@torch.no_grad()
def sample_and_score(
    model: Any,
    reference: ReferenceContext,
    prompts: list[list[int]],
    tokenizer: Any,
    recipe: Recipe,
    options: EvalOptions,
) -> dict[str, Any]:
    """N samples per prompt from π and from π_ref; KL(π‖π_ref) ≈ mean over π's samples of log π(y|x) − log π_ref(y|x).

    Log-probs are summed over each sample's tokens up to and including its first EOS. The reverse KL(π_ref‖π) is
    estimated from the reference's samples the same way. Both are unbiased Monte Carlo estimates of non-negative
    quantities, so either can come out slightly below 0 when the two policies are close.
    """
    from transformers import set_seed

    set_seed(recipe.training.seed)  # the same samples on every rerun
    policy = _sample(model, reference, False, prompts, tokenizer, recipe, options)
    ref = _sample(model, reference, True, prompts, tokenizer, recipe, options)
    return {
        "prompts": len(prompts),
        "samples_per_prompt": options.generate,
        "max_new_tokens": options.max_new_tokens,
        "seed": recipe.training.seed,
        "kl_policy_reference": statistics.fmean(policy.log_ratios),
        "kl_reference_policy": -statistics.fmean(ref.log_ratios),
        "policy_length_mean": statistics.fmean(policy.lengths),
        "policy_length_median": statistics.median(policy.lengths),
        "policy_ended_with_eos": statistics.fmean(policy.ended),
        "reference_length_mean": statistics.fmean(ref.lengths),
        "reference_length_median": statistics.median(ref.lengths),
        "reference_ended_with_eos": statistics.fmean(ref.ended),
    }


# --------------------------------------------------------------------------------------------------- output


def write_outputs(outputs: Outputs, scores: PairScores, summary: dict[str, Any]) -> None:
    """pairs.jsonl, then summary.json; each written to a temporary name and renamed, so neither is half-written."""
    outputs.pairs.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(outputs.pairs, pair_records(scores))
    write_atomic(outputs.summary, json.dumps(summary, indent=2) + "\n")


def report_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) lines of the printed report."""
    h = summary["margin"]
    dropped = sum(summary["dropped_pairs"].values())
    target = summary["target"]
    rows = [
        ("pairs", f"{summary['pairs']:,}" + (f" ({dropped:,} dropped: prompt fills max_length)" if dropped else "")),
        ("reward accuracy (h > 0)", f"{summary['reward_accuracy']:.3f}"),
        ("mean margin h", f"{h['mean']:.4f} (std {h['std']:.4f})"),
        ("margin p10 / p50 / p90", f"{h['p10']:.4f} / {h['p50']:.4f} / {h['p90']:.4f}"),
        ("target", "none (DPO with hard labels: h → ∞)" if target is None else f"{target:.4f}"),
        ("mean loss", f"{summary['loss']:.4f}"),
        ("Δ log π chosen", f"{summary['logratio_chosen']:.4f}"),
        ("Δ log π rejected", f"{summary['logratio_rejected']:.4f}"),
    ]
    if (gen := summary["generation"]) is not None:
        rows += [
            (
                "samples",
                f"{gen['samples_per_prompt']} per prompt × {gen['prompts']} prompts, ≤ {gen['max_new_tokens']} tokens",
            ),
            ("KL(π‖π_ref) per sequence", f"{gen['kl_policy_reference']:.4f}"),
            ("KL(π_ref‖π) per sequence", f"{gen['kl_reference_policy']:.4f}"),
            ("response length π", _lengths(gen, "policy")),
            ("response length π_ref", _lengths(gen, "reference")),
        ]
    return rows


def _lengths(gen: dict[str, Any], who: str) -> str:
    mean, median, eos = (gen[f"{who}_{key}"] for key in ("length_mean", "length_median", "ended_with_eos"))
    return f"mean {mean:.1f}, median {median:g} tokens; {eos:.0%} end with a stop token (EOS or end of turn)"


def print_report(summary: dict[str, Any], console: Any) -> None:
    """The summary as a two-column table, then where the per-pair results went."""
    from rich.table import Table

    objective = summary["objective"]
    title = f"{summary['data']}: {objective['loss']} τ={objective['tau']:g}, log-probs {objective['logps']}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in report_rows(summary):
        table.add_row(what, value)
    console.print(table)
    console.print(f"reference: {summary['reference']}", markup=False)
    console.print(f"per-pair results: {summary['pairs_file']}", markup=False)
