"""What `psipo eval` leaves behind: where its files go, the per-pair records, the summary, and the printed report.

pairs.jsonl holds one record per evaluated pair, summary.json the aggregate (with the KL estimates when sampled);
both are written to a temporary name and renamed. The console report is the summary as a two-column table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from psipo_cli.data.pairs import PreferenceData
from psipo_cli.errors import UserError
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.files import write_atomic, write_jsonl_atomic
from psipo_cli.tools.scoring import PairScores, aggregation

EVAL_DIR = "eval"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class Outputs:
    pairs: Path
    summary: Path


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


def pair_records(scores: PairScores) -> list[dict[str, Any]]:
    """One JSON object per pair; `pair` is its 0-based position among the evaluated pairs."""
    records = []
    for i in range(scores.margin.numel()):
        record: dict[str, Any] = {"pair": i, "margin": scores.margin[i].item()}
        if scores.loss is not None:  # rlhf has no pair loss
            record["loss"] = scores.loss[i].item()
        record |= {
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


def summarize(
    recipe: Recipe, run_dir: Path, data: PreferenceData, scores: PairScores | None, outputs: Outputs
) -> dict[str, Any]:
    """The summary: reward accuracy, margin distribution, target, loss and drift from the reference, when there are
    pairs; the prompts only when --generate samples from prompt-only data (its results are added as `generation`)."""
    objective = recipe.objective
    summary: dict[str, Any] = {"run_dir": str(run_dir), "data": data.source}
    if scores is None:
        summary |= {"prompts": len(data.dataset), "dropped_prompts": data.dropped}
    else:
        summary |= {"pairs": scores.margin.numel(), "dropped_pairs": data.dropped}
    summary |= {
        "objective": {"loss": objective.loss, "tau": objective.tau, "psi": objective.psi, "logps": aggregation(recipe)},
        "reference": reference_description(recipe),
    }
    if scores is not None:
        summary |= _pair_summary(scores) | {"pairs_file": str(outputs.pairs)}
    summary["generation"] = None
    return summary


def _pair_summary(scores: PairScores) -> dict[str, Any]:
    h = scores.margin.double()
    p10, p50, p90 = torch.quantile(h, torch.tensor([0.1, 0.5, 0.9], dtype=h.dtype)).tolist()
    return {
        "reward_accuracy": (h > 0).double().mean().item(),
        "margin": {
            "mean": h.mean().item(),
            "std": h.std().item() if h.numel() > 1 else 0.0,  # sample standard deviation (n − 1)
            "p10": p10,
            "p50": p50,
            "p90": p90,
        },
        "target": None if scores.target is None else _mean(scores.target),
        "loss": None if scores.loss is None else _mean(scores.loss),
        "logps_chosen": _mean(scores.policy_chosen),
        "logps_rejected": _mean(scores.policy_rejected),
        "logratio_chosen": _mean(scores.policy_chosen - scores.ref_chosen),  # drift from the reference: a KL proxy
        "logratio_rejected": _mean(scores.policy_rejected - scores.ref_rejected),
    }


def reference_description(recipe: Recipe) -> str:
    if recipe.adapter.init_from:
        return f"starting adapter {recipe.adapter.init_from}"
    return f"base model {recipe.model.name_or_path} with the adapter disabled"


def write_outputs(outputs: Outputs, scores: PairScores | None, summary: dict[str, Any]) -> None:
    """pairs.jsonl, then summary.json; each written to a temporary name and renamed, so neither is half-written.

    Without pairs (prompt-only data) an earlier evaluation's pairs.jsonl, replaced with --overwrite, is removed: it
    would not belong to the new summary.
    """
    outputs.pairs.parent.mkdir(parents=True, exist_ok=True)
    if scores is None:
        outputs.pairs.unlink(missing_ok=True)
    else:
        write_jsonl_atomic(outputs.pairs, pair_records(scores))
    write_atomic(outputs.summary, json.dumps(summary, indent=2) + "\n")


def report_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) lines of the printed report."""
    if "margin" in summary:
        rows = _pair_rows(summary)
    else:
        dropped = sum(summary["dropped_prompts"].values())
        rows = [("prompts", f"{summary['prompts']:,}" + (f" ({dropped:,} left out)" if dropped else ""))]
    if (gen := summary["generation"]) is not None:
        rows += _generation_rows(gen, summary["objective"]["tau"])
    return rows


def _pair_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    h = summary["margin"]
    dropped = sum(summary["dropped_pairs"].values())
    target, loss = summary["target"], summary["loss"]
    rows = [
        ("pairs", f"{summary['pairs']:,}" + (f" ({dropped:,} dropped: prompt fills max_length)" if dropped else "")),
        ("reward accuracy (h > 0)", f"{summary['reward_accuracy']:.3f}"),
        ("mean margin h", f"{h['mean']:.4f} (std {h['std']:.4f})"),
        ("margin p10 / p50 / p90", f"{h['p10']:.4f} / {h['p50']:.4f} / {h['p90']:.4f}"),
    ]
    if target is not None:
        rows.append(("target", f"{target:.4f}"))
    elif summary["objective"]["loss"] == "dpo":
        rows.append(("target", "none (DPO with hard labels: h → ∞)"))
    if loss is not None:  # rlhf: eq. 6 has no pair loss
        rows.append(("mean loss", f"{loss:.4f}"))
    rows.append(("Δ log π chosen", f"{summary['logratio_chosen']:.4f}"))
    rows.append(("Δ log π rejected", f"{summary['logratio_rejected']:.4f}"))
    return rows


def _generation_rows(gen: dict[str, Any], tau: float) -> list[tuple[str, str]]:
    rows = [
        (
            "samples",
            f"{gen['samples_per_prompt']} per prompt × {gen['prompts']} prompts, ≤ {gen['max_new_tokens']} tokens",
        ),
        ("KL(π‖π_ref) per sequence", f"{gen['kl_policy_reference']:.4f}"),
        ("KL(π_ref‖π) per sequence", f"{gen['kl_reference_policy']:.4f}"),
    ]
    if "reward_policy" in gen:
        rows.append(("mean reward π / π_ref", f"{gen['reward_policy']:.4f} / {gen['reward_reference']:.4f}"))
    if "rlhf_objective" in gen:
        rows.append((f"E[r] − τ·KL(π‖π_ref), τ = {tau:g} (eq. 6)", f"{gen['rlhf_objective']:.4f}"))
    rows.append(("response length π", _lengths(gen, "policy")))
    rows.append(("response length π_ref", _lengths(gen, "reference")))
    return rows


def _lengths(gen: dict[str, Any], who: str) -> str:
    mean, median, eos = (gen[f"{who}_{key}"] for key in ("length_mean", "length_median", "ended_with_eos"))
    return f"mean {mean:.1f}, median {median:g} tokens; {eos:.0%} end with a stop token (EOS or end of turn)"


def print_report(summary: dict[str, Any], console: Any) -> None:
    """The summary as a two-column table, then where the per-pair results went."""
    from rich.markup import escape
    from rich.table import Table

    objective = summary["objective"]
    title = f"{summary['data']}: {objective['loss']} τ={objective['tau']:g}, log-probs {objective['logps']}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in report_rows(summary):
        table.add_row(escape(what), escape(value))  # plain text: "E[r]" is not rich markup
    console.print(table)
    console.print(f"reference: {summary['reference']}", markup=False)
    if (gen := summary["generation"]) is not None and "reward_model" in gen:
        console.print(f"rewards: the run's reward model {gen['reward_model']}", markup=False)
    if "pairs_file" in summary:
        console.print(f"per-pair results: {summary['pairs_file']}", markup=False)
