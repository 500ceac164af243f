"""Read preference pairs, check every row, and hand TRL one plain-text format.

Rows come from a local .jsonl/.json/.parquet/.csv file or a hub dataset. Each row is either plain
(prompt/chosen/rejected strings; without a prompt column, chosen/rejected may be whole dialogues as text, as in
HH-RLHF, split at the last assistant turn they share) or conversational (lists of {role, content} messages,
with or without a separate prompt column); conversational rows are rendered with the tokenizer's chat template
here, so one file may mix both and every later step (TRL's tokenisation, prefix sharing) sees one format.
Every response leaves here ending with its one end marker: EOS for plain text, the template's end-of-turn
token for chat (`psipo_cli.data.chat`), so TRL appends nothing.
The output columns are `prompt`, `chosen`, `rejected` and, with soft labels, `p_hat`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from datasets.fingerprint import Hasher
from jinja2 import TemplateError

from psipo_cli.data.chat import ChatRenderer, end_with_eos
from psipo_cli.errors import UserError, shown
from psipo_cli.recipe.loader import looks_local
from psipo_cli.recipe.schema import Columns, DataSection, DataSource, Recipe

MAX_LISTED_ROWS = 5  # bad rows named in one error line; the total is always given
CSV_FIELD_LIMIT = 1 << 30  # the csv module's default (128 KiB) refuses long but legitimate responses
MISSING = object()  # a column absent from one row (the first row's columns are checked separately)
# Where an assistant turn begins in dialogues stored as one text (Anthropic HH-RLHF). A prompt split off such
# text ends just after one of these; add other dialogue formats' assistant markers here.
ASSISTANT_TURN_MARKERS = ("\n\nAssistant:",)


@dataclass
class PreferenceData:
    """Validated pairs plus what happened to the rows on the way."""

    dataset: Dataset
    source: str
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    fingerprint: str = ""  # content hash of the pairs as loaded (names their cache folder; resume compares it)
    truncated: int | None = None  # pairs cut to max_length, where counted (reward.tokenize_pairs)


class RowErrors:
    """Collect row problems; fail with the first few row numbers and the total count."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, row: int, problem: str) -> None:
        self.items.append(f"row {row}: {problem}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "; ".join(self.items[:MAX_LISTED_ROWS])
        more = f" (first {MAX_LISTED_ROWS} shown)" if len(self.items) > MAX_LISTED_ROWS else ""
        raise UserError(f"{len(self.items)} bad row(s){more}: {shown}", where=self.where)


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"{err.msg.removesuffix(' at')} at column {err.colno}"  # 'Unterminated string starting at'
                raise UserError(f"line {number} is not valid JSON ({problem})", where=str(path)) from None
            except RecursionError:
                raise UserError(f"line {number} nests too deeply to be a row", where=str(path)) from None


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON (line {err.lineno}: {err.msg})", where=str(path)) from None
    except RecursionError:
        raise UserError("not valid data: it nests too deeply", where=str(path)) from None
    if not isinstance(data, list):
        raise UserError("a .json data file must hold a list of rows", where=str(path))
    yield from enumerate(data, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"cannot read parquet ({str(err).splitlines()[0]})", where=str(path)) from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            # Row numbers count the header as line 1, as a spreadsheet shows them.
            yield from enumerate(reader, start=2)
        except csv.Error as err:
            raise UserError(f"line {reader.line_num} is not valid CSV ({err})", where=str(path)) from None


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def read_rows(source: DataSource) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(display name, iterator of (row number, row)) for a local file or a hub dataset."""
    path = Path(source.path)
    if looks_local(source.path) or path.exists():
        if not path.exists():
            raise UserError("data file not found", where=source.path)
        if path.is_dir():
            raise UserError("expected a data file, got a directory", where=source.path)
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise UserError(f"unsupported data file type; use one of {sorted(READERS)}", where=source.path)
        return source.path, _decode_errors(reader(path), source.path)
    return f"{source.path}:{source.split}", enumerate(_load_hub(source), start=1)


def _decode_errors(rows: Iterator[tuple[int, Any]], where: str) -> Iterator[tuple[int, Any]]:
    try:
        yield from rows
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text (binary or corrupt file?)", where=where) from None


def _load_hub(source: DataSource) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(source.path, source.subset, split=source.split)
    except Exception as err:  # datasets raises many types (not found, network, bad split); all are user-facing
        raise UserError(f"cannot load hub dataset ({str(err).splitlines()[0]})", where=source.path) from None


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in value
        )
    )


def field_problem(value: Any, name: str) -> str | None:
    if value is MISSING:
        return f"'{name}' is missing"
    if value is None:
        return f"'{name}' is null"
    if isinstance(value, str):
        return f"'{name}' is empty" if not value.strip() else None
    if _is_messages(value):
        return None
    return f"'{name}' must be text or a list of {{role, content}} messages, got {type(value).__name__}"


def _soft_label(row: dict[str, Any], columns: Columns) -> tuple[float | None, str | None]:
    """(p̂, problem) from the label column or the vote columns."""
    if columns.label is not None:
        value = row.get(columns.label)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None, f"label '{columns.label}' must be a number in [0, 1], got {shown(value)}"
        try:
            p_hat = float(value)
        except (ValueError, OverflowError):
            return None, f"label '{columns.label}' must be a number in [0, 1], got {shown(value)}"
        if math.isnan(p_hat) or not 0.0 <= p_hat <= 1.0:
            return None, f"label '{columns.label}' must be in [0, 1], got {shown(value)}"
        return p_hat, None
    if columns.votes_chosen is not None and columns.votes_total is not None:
        chosen, total = row.get(columns.votes_chosen), row.get(columns.votes_total)
        try:
            chosen_n, total_n = int(chosen), int(total)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            return None, f"votes must be whole numbers, got {shown(chosen)}/{shown(total)}"
        if total_n <= 0 or not 0 <= chosen_n <= total_n:
            return None, f"votes must satisfy 0 <= chosen <= total and total > 0, got {chosen_n}/{total_n}"
        return chosen_n / total_n, None
    if columns.score_chosen is not None and columns.score_rejected is not None:
        # Bradley–Terry on ratings (the paper's eq. 4 assumption, made explicit): p̂ = σ(Δs / scale).
        chosen, rejected = row.get(columns.score_chosen), row.get(columns.score_rejected)
        try:
            delta = (float(chosen) - float(rejected)) / columns.score_scale  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):  # OverflowError: float() of a 400-digit integer
            return None, f"scores must be numbers, got {shown(chosen)}/{shown(rejected)}"
        if math.isnan(delta):
            return None, f"scores must be numbers, got {shown(chosen)}/{shown(rejected)}"
        return 1.0 / (1.0 + math.exp(-max(min(delta, 50.0), -50.0))), None
    return None, None


def _whole_conversations(chosen: Any, rejected: Any) -> bool:
    """chosen and rejected are full conversations sharing their leading (prompt) messages."""
    return (
        _is_messages(chosen)
        and _is_messages(rejected)
        and len(chosen) > 1
        and len(rejected) > 1
        and chosen[0] == rejected[0]
    )


def _split_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Whole conversations in chosen/rejected: the shared leading messages are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _has_dialogue(text: Any) -> bool:
    return isinstance(text, str) and any(marker in text for marker in ASSISTANT_TURN_MARKERS)


def _split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Whole dialogues in chosen/rejected: the prompt runs to the end of the last assistant-turn marker both
    share. Not their longest common prefix, which cuts into responses that begin alike ("I think X"/"I think Y")."""
    pairs = zip(chosen, rejected, strict=False)  # stops at the shorter: one may extend the other
    shared = chosen[: next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(chosen), len(rejected)))]
    cut = max((shared.rfind(m) + len(m) for m in ASSISTANT_TURN_MARKERS if m in shared), default=None)
    if cut is None:
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalise_row(row: Any, columns: Columns, render: ChatRenderer) -> tuple[dict[str, Any] | None, str | None]:
    """(plain-text row, problem)."""
    if not isinstance(row, dict):
        return None, f"expected an object with columns, got {type(row).__name__}"
    prompt, chosen, rejected = (row.get(c, MISSING) for c in (columns.prompt, columns.chosen, columns.rejected))
    for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if (problem := field_problem(value, name)) is not None:
            return None, problem
    if _whole_conversations(chosen, rejected):
        # e.g. UltraFeedback: chosen/rejected hold the user turn too; a prompt column, if any, repeats it.
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    elif prompt is MISSING and isinstance(chosen, str) and isinstance(rejected, str):
        # e.g. HH-RLHF: chosen/rejected are whole dialogues as text, the prompt implicit in both.
        if (split := _split_dialogue(chosen, rejected)) is None:
            markers = " or ".join(map(repr, ASSISTANT_TURN_MARKERS))
            return None, f"no '{columns.prompt}' column, and chosen and rejected share no {markers} turn to split it at"
        prompt, chosen, rejected = split
        for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if (problem := field_problem(value, name)) is not None:
                return None, f"{problem} after the shared dialogue"
    elif (problem := field_problem(prompt, columns.prompt)) is not None:
        return None, problem
    p_hat, problem = _soft_label(row, columns)
    if problem is not None:
        return None, problem
    try:
        if any(not isinstance(v, str) for v in (prompt, chosen, rejected)):
            prompt_text, chosen = render(prompt, chosen)
            _, rejected = render(prompt, rejected)
            prompt = prompt_text
        else:
            chosen, rejected = (end_with_eos(text, render.tokenizer) for text in (chosen, rejected))
    except ValueError as err:
        return None, str(err)
    except (TypeError, TemplateError) as err:  # a template that refuses these messages (e.g. roles out of order)
        return None, f"the chat template cannot render this row ({str(err).splitlines()[0] if str(err) else err!r})"
    if chosen == rejected:
        return None, "chosen and rejected are identical"
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if columns.has_labels:
        out["p_hat"] = p_hat
    return out, None


def _check_columns(first: Any, columns: Columns, where: str) -> None:
    if not isinstance(first, dict):
        return
    needed = [columns.chosen, columns.rejected]
    implicit = _is_messages(first.get(columns.chosen)) or _has_dialogue(first.get(columns.chosen))
    if columns.prompt in first or not implicit:
        needed.insert(0, columns.prompt)  # the prompt may only be implicit in whole conversations or dialogues
    needed += columns.label_columns
    missing = [c for c in needed if c not in first]
    if missing:
        raise UserError(
            f"missing column(s) {missing}; the data has {sorted(first)} (map them under data.columns)",
            where=where,
        )


def validated_rows(
    source: DataSource, columns: Columns, tokenizer: Any, key: str
) -> tuple[str, list[tuple[Any, dict]]]:
    """(where, [(original row, normalised plain-text row)]) for `source`; fails on any bad row or no rows.

    `key` names the source in messages (e.g. 'data.train'); `where` adds the file or hub id to it.
    """
    name, rows = read_rows(source)
    where = f"{key} ({name})"
    errors = RowErrors(where)
    render = ChatRenderer(tokenizer)
    good: list[tuple[Any, dict]] = []
    count = 0
    for number, row in rows:
        if count == 0:
            _check_columns(row, columns, where)
        count += 1
        normalised, problem = normalise_row(row, columns, render)
        if problem is not None:
            errors.add(number, problem)
        else:
            good.append((row, normalised))  # type: ignore[arg-type]
    if count == 0:
        raise UserError("no rows", where=where)
    errors.raise_if_any()
    return where, good


def load_pairs(source: DataSource, data: DataSection, tokenizer: Any, split_name: str) -> PreferenceData:
    """Read, validate and normalise one split; fail on bad rows, drop over-long prompts per `data.too_long`."""
    where, pairs = validated_rows(source, data.columns, tokenizer, f"data.{split_name}")
    rows = [normalised for _, normalised in pairs]
    good, dropped = drop_long_prompts(rows, data, tokenizer, where)
    if not good:
        raise UserError(f"no usable pairs left ({dropped})", where=where)
    digest = Hasher.hash(good)
    return PreferenceData(cached_dataset(good, digest), where, len(rows), dropped, digest)


def load_split(recipe: Recipe, tokenizer: Any, split_name: str) -> PreferenceData:
    """The pairs of data.<split_name> ("train" or "eval")."""
    return load_pairs(getattr(recipe.data, split_name), recipe.data, tokenizer, split_name)


@contextlib.contextmanager
def main_processes_first() -> Iterator[None]:
    """The global main process runs the block first, then each node's local main, then everyone else: cache
    writes happen once per cache the processes can read (shared or node-local disk).

    accelerate's public API; replaces TRL's private `global_then_local_main_first` (training/trl_internals.py).
    """
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first(), state.local_main_process_first():
        yield


def cached_dataset(rows: list[dict[str, Any]], digest: str) -> Dataset:
    """The pairs as an Arrow dataset stored under the datasets cache, in a folder named by their content hash
    `digest` (Hasher.hash of the rows).

    Every process of a launch, and every rerun on the same data, opens the same files, so the tokenised copies
    TRL caches beside a dataset are shared and reused. An in-memory dataset would give each process its own
    temporary cache.
    """
    import datasets

    path = Path(datasets.config.HF_DATASETS_CACHE) / "psipo-pairs" / digest
    with main_processes_first():
        if not (path / "state.json").exists():
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            Dataset.from_list(rows).save_to_disk(str(tmp))
            try:
                os.replace(tmp, path)  # complete or absent: never a half-written cache
            except OSError:  # another node or process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def drop_long_prompts(
    rows: list[dict[str, Any]], data: DataSection, tokenizer: Any, where: str, room: int = 0
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pairs: a prompt of max_length tokens or more leaves no response token after truncation. Prompts to sample
    from (`room`: the new tokens a response may take): one of more than max_length − room tokens. Drop or fail."""
    # verbose=False: transformers would warn on stderr about prompts longer than the model; they are handled here.
    encoded = tokenizer([r["prompt"] for r in rows], add_special_tokens=True, verbose=False)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    longest = data.max_length - room if room else data.max_length - 1
    too_long = [i for i, n in enumerate(lengths) if n > longest]
    if not too_long:
        return rows, {}
    fill = f"data.max_length={data.max_length}" + (f" with rollout.max_new_tokens={room}" if room else "")
    if data.too_long == "error":
        listed = ", ".join(str(i + 1) for i in too_long[:MAX_LISTED_ROWS])
        raise UserError(
            f"{len(too_long)} prompt(s) fill {fill} tokens ({'rows' if room else 'pairs'} {listed}); raise "
            "max_length or set data.too_long: drop",
            where=where,
        )
    keep = set(range(len(rows))) - set(too_long)
    reason = f"prompt > {longest} tokens ({fill})" if room else f"prompt >= max_length ({data.max_length} tokens)"
    return [rows[i] for i in sorted(keep)], {reason: len(too_long)}
