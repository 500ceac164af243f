"""Prompts for the stages that sample their own responses (rlhf, online_psipo).

They come from preference data (its prompt column, or the prompt implicit in whole conversations or HH-RLHF
dialogues, found exactly as `pairs` finds it) or from a prompt-only file (a prompt column of text or chat
messages). Conversational prompts are rendered with the chat template up to the assistant's turn, as the prompt
of a rendered pair is, so a sampled response continues exactly the text a preference pair's response does.
Each distinct prompt is kept once: preference data often holds several pairs per prompt, and the sampler already
draws `rollout.responses_per_prompt` responses for each.
"""

from __future__ import annotations

from typing import Any

from datasets.fingerprint import Hasher
from jinja2 import TemplateError

from psipo_cli.data.chat import ChatRenderer
from psipo_cli.data.pairs import (
    MISSING,
    PreferenceData,
    RowErrors,
    cached_dataset,
    drop_long_prompts,
    field_problem,
    normalise_row,
    read_rows,
)
from psipo_cli.errors import UserError
from psipo_cli.recipe.schema import Columns, DataSource, Recipe


def _prompt_of(row: Any, columns: Columns, render: ChatRenderer) -> tuple[str | None, str | None]:
    """(the prompt as text, problem) of one row: a pair's prompt, or a prompt-only row's."""
    if not isinstance(row, dict):
        return None, f"expected an object with columns, got {type(row).__name__}"
    if columns.chosen in row or columns.rejected in row:  # a preference pair: its prompt, found as training finds it
        pair, problem = normalise_row(row, columns, render)
        return (pair["prompt"], None) if pair is not None else (None, problem)
    prompt = row.get(columns.prompt, MISSING)
    if (problem := field_problem(prompt, columns.prompt)) is not None:
        return None, problem
    if isinstance(prompt, str):
        return prompt, None
    try:
        return render.prompt(prompt), None
    except ValueError as err:
        return None, str(err)
    except (TypeError, TemplateError) as err:
        return None, f"the chat template cannot render this prompt ({str(err).splitlines()[0] if str(err) else err!r})"


def load_prompts(recipe: Recipe, tokenizer: Any, split_name: str) -> PreferenceData:
    """The distinct prompts of data.<split_name> as a dataset with one `prompt` column; fails on any bad row."""
    source: DataSource = getattr(recipe.data, split_name)
    # Only where the prompt is read from: label columns play no part in sampling.
    mapping = recipe.data.columns
    columns = Columns(prompt=mapping.prompt, chosen=mapping.chosen, rejected=mapping.rejected)
    name, rows = read_rows(source)
    where = f"data.{split_name} ({name})"
    errors, render = RowErrors(where), ChatRenderer(tokenizer)
    prompts: dict[str, None] = {}  # insertion-ordered set: the first occurrence's position
    count = 0
    for number, row in rows:
        count += 1
        prompt, problem = _prompt_of(row, columns, render)
        if problem is not None:
            errors.add(number, problem)
        else:
            prompts[prompt] = None  # type: ignore[index]
    if count == 0:
        raise UserError("no rows", where=where)
    errors.raise_if_any()
    rows_kept = [{"prompt": prompt} for prompt in prompts]
    room = recipe.rollout.max_new_tokens if recipe.rollout else 0
    good, dropped = drop_long_prompts(rows_kept, recipe.data, tokenizer, where, room=room)
    if count > len(rows_kept):
        dropped = {"repeated prompt (each is sampled from once per pass)": count - len(rows_kept), **dropped}
    if not good:
        raise UserError(f"no usable prompts left ({dropped})", where=where)
    digest = Hasher.hash(good)
    return PreferenceData(cached_dataset(good, digest), where, count, dropped, digest)
