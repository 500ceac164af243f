"""`psipo label`: write a data file back with p̂ = σ(r(chosen) − r(rejected)) from a trained reward model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psipo_cli.data.pairs import validated_rows
from psipo_cli.errors import UserError
from psipo_cli.models.loading import load_tokenizer, to_inference_device
from psipo_cli.recipe.schema import Columns, DataSource
from psipo_cli.run.files import write_jsonl_atomic
from psipo_cli.training.reward import (
    load_reward_model,
    pair_ids,
    preference_probability,
    resolve_reward_run,
    score_ids,
)


@dataclass
class LabelReport:
    rows: int
    mean_p_hat: float
    agreement: float  # share of rows where the reward model agrees with the chosen/rejected order (p̂ > ½)
    out: Path
    truncated: int  # pairs cut to data.max_length tokens before scoring, as in training
    max_length: int


def label_file(
    target: Path, data: str, out: Path, column: str = "p_hat", overwrite: bool = False, batch_size: int = 32
) -> LabelReport:
    if out.suffix != ".jsonl":
        raise UserError("labelled data is written as JSON lines: use a .jsonl name", where=str(out))
    if out.exists() and not overwrite:
        raise UserError("exists; pass --overwrite to replace it", where=str(out))
    if not out.parent.is_dir():
        raise UserError("the output's directory does not exist", where=str(out))
    recipe, run_dir = resolve_reward_run(target)
    tokenizer = load_tokenizer(recipe.model)
    # Only prompt/chosen/rejected are read: the file to label need not carry any label column yet.
    mapping = recipe.data.columns
    columns = Columns(prompt=mapping.prompt, chosen=mapping.chosen, rejected=mapping.rejected)
    _, pairs = validated_rows(DataSource(path=data), columns, tokenizer, "DATA")
    model = to_inference_device(load_reward_model(recipe, run_dir, tokenizer), recipe.model)
    encoded = [pair_ids(row, tokenizer, recipe.data.max_length) for _, row in pairs]
    chosen, rejected = (
        score_ids(model, tokenizer.pad_token_id, [e[key] for e in encoded], batch_size)
        for key in ("chosen_ids", "rejected_ids")
    )
    labels = [preference_probability(c, r) for c, r in zip(chosen, rejected, strict=True)]
    write_jsonl_atomic(out, [{**original, column: p_hat} for (original, _), p_hat in zip(pairs, labels, strict=True)])
    agreement = sum(p > 0.5 for p in labels) / len(labels)
    truncated = sum(e["truncated"] for e in encoded)
    return LabelReport(len(labels), sum(labels) / len(labels), agreement, out, truncated, recipe.data.max_length)
