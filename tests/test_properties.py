"""Property-based tests: whatever recipe, override or data row a user writes, psipo either accepts it or says why
in a `UserError`; no other exception (a traceback) ever escapes the recipe loader or the data validator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psipo_cli.data.pairs import validated_rows
from psipo_cli.errors import UserError
from psipo_cli.objectives import psipo_target
from psipo_cli.recipe.loader import deep_merge, load_recipe
from psipo_cli.recipe.schema import Columns, DataSource, Recipe
from tests.conftest import TINY_MODEL, tiny_recipe

# database=None: nothing written into the checkout; failures print their example for reproduction.
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# --- recipes -------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["1e-3", "-1", "0", "ipo", "psipo", "logit", "2*q - 1", "all-linear", "~", ".", "/"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
KNOWN_KEYS = [
    "extends",
    "description",
    "model.name_or_path",
    "model.dtype",
    "adapter.r",
    "adapter.target_modules",
    "data.train",
    "data.eval",
    "data.columns.label",
    "data.max_length",
    "objective.loss",
    "objective.tau",
    "objective.psi",
    "objective.label_eps",
    "training.max_steps",
    "training.learning_rate",
    "distributed.strategy",
    "output.dir",
]
SECTIONS = ["", "model.", "adapter.", "data.", "data.columns.", "data.train.", "objective.", "training.", "output."]
KEY_PATHS = st.sampled_from(KNOWN_KEYS) | st.builds(
    lambda section, name: section + name, st.sampled_from(SECTIONS), st.text(min_size=1, max_size=10)
)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value  # type: ignore[return-value]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


def _load_or_user_error(path: Path, overrides: list[str] | None = None) -> Recipe | None:
    """The recipe, or None after a UserError that is one line naming something; anything else fails the test."""
    try:
        return load_recipe(path, overrides)
    except UserError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return None


@SETTINGS
@given(changes=st.lists(st.tuples(KEY_PATHS, VALUES), max_size=4))
def test_recipe_with_random_keys_and_values_loads_or_is_a_user_error(workdir: Path, changes) -> None:
    raw = tiny_recipe(workdir / "run")
    for dotted, value in changes:
        raw = deep_merge(raw, _nest(dotted, value))
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    _load_or_user_error(path)


@SETTINGS
@given(content=st.text(max_size=200) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_recipe_file_of_random_text_loads_or_is_a_user_error(workdir: Path, content: str) -> None:
    path = workdir / "text.yaml"
    path.write_text(content, encoding="utf-8")
    assert _load_or_user_error(path) is None  # nothing this short is a complete recipe


@SETTINGS
@given(
    overrides=st.lists(
        st.builds(lambda key, value: f"{key}={value}", KEY_PATHS, st.text(max_size=20) | SCALARS.map(str))
        | st.text(max_size=30),
        max_size=4,
    )
)
def test_random_overrides_load_or_are_a_user_error(workdir: Path, overrides: list[str]) -> None:
    path = workdir / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(workdir / "run")), encoding="utf-8")
    _load_or_user_error(path, overrides)


# --- data rows -----------------------------------------------------------------------------------------------

ROLES = st.sampled_from(["user", "assistant", "system"])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=10)}) | st.fixed_dictionaries(
    {"role": ROLES | SCALARS, "content": st.text(max_size=10) | SCALARS}
)
FIELDS = st.one_of(
    st.text(min_size=1, max_size=30), st.lists(MESSAGE, max_size=3), SCALARS, st.lists(SCALARS, max_size=3)
)
NUMBERS = st.one_of(
    st.floats(min_value=0, max_value=1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.sampled_from([10**400, -(10**400), "0.5", "NaN", "inf", "high"]),
    st.none(),
)
LABEL_COLUMNS = {
    "none": {},
    "label": {"label": "p_hat"},
    "votes": {"votes_chosen": "v", "votes_total": "n"},
    "scores": {"score_chosen": "sc", "score_rejected": "sr"},
}
GOOD_ROW = {"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go.", "p_hat": 0.7, "v": 3, "n": 4, "sc": 2, "sr": 1}
# Whole conversations in chosen/rejected (UltraFeedback's layout), sharing, or not, their first message.
CONVERSATIONS = st.builds(
    lambda first, other, a, b: {"chosen": [first, a], "rejected": [other or first, b]},
    MESSAGE,
    st.none() | MESSAGE,
    MESSAGE,
    MESSAGE,
)


def _row(texts: dict, numbers: dict, removed: list[str], extra: dict) -> dict[str, Any]:
    """A good row with some fields replaced, some removed, and unrelated columns added."""
    row = {**extra, **GOOD_ROW, **texts, **numbers}
    for name in removed:
        row.pop(name, None)
    return row


ROWS = st.builds(
    _row,
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected"]), FIELDS, max_size=3) | CONVERSATIONS,
    st.dictionaries(st.sampled_from(["p_hat", "v", "n", "sc", "sr"]), NUMBERS, max_size=3),
    st.lists(st.sampled_from(sorted(GOOD_ROW)), max_size=2),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=2),
)


@pytest.fixture(scope="module")
def tokenizer():
    from psipo_cli.models.loading import load_tokenizer
    from psipo_cli.recipe.schema import ModelSection

    return load_tokenizer(ModelSection(name_or_path=str(TINY_MODEL)))


def _check_pairs(pairs: list[tuple[Any, dict]], columns: Columns) -> None:
    """What validated_rows promises about the rows it accepts."""
    for _, out in pairs:
        assert all(isinstance(out[k], str) and out[k] for k in ("prompt", "chosen", "rejected")), out
        assert out["chosen"] != out["rejected"]
        if columns.has_labels:
            assert isinstance(out["p_hat"], float) and 0.0 <= out["p_hat"] <= 1.0 and not math.isnan(out["p_hat"])


@SETTINGS
@given(
    rows=st.lists(st.one_of(ROWS, ROWS, ROWS, SCALARS), min_size=1, max_size=5),
    good_first=st.booleans(),  # a good first row gets past the column check to the per-row checks
    labels=st.sampled_from(sorted(LABEL_COLUMNS)),
)
def test_random_rows_validate_or_are_a_user_error(workdir: Path, tokenizer, rows, good_first, labels) -> None:
    path = workdir / "rows.jsonl"
    rows = [GOOD_ROW, *rows] if good_first else rows
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    columns = Columns.model_validate(LABEL_COLUMNS[labels])
    try:
        _, pairs = validated_rows(DataSource(path=str(path)), columns, tokenizer, "data.train")
    except UserError as err:
        assert "data.train" in str(err) and "\n" not in str(err), str(err)
        return
    _check_pairs(pairs, columns)


@SETTINGS
@given(lines=st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_random_text_as_jsonl_validates_or_is_a_user_error(workdir: Path, tokenizer, lines: list[str]) -> None:
    path = workdir / "text.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        validated_rows(DataSource(path=str(path)), Columns(), tokenizer, "data.train")
    except UserError as err:
        assert "\n" not in str(err), str(err)


# --- Ψ expressions -------------------------------------------------------------------------------------------

ATOMS = st.one_of(
    st.just("q"),
    st.integers(-3, 5).map(str),
    st.floats(0.01, 10, allow_nan=False).map(lambda x: f"{x:.3g}"),
    st.sampled_from(["os", "__import__('os')", "q.real", "[q]", "q if q else 1", "lambda: q", "1e400", "True", "'s'"]),
)
EXPRESSIONS = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.builds(lambda a, op, b: f"({a} {op} {b})", inner, st.sampled_from(["+", "-", "*", "/", "**", "%"]), inner),
        st.builds(
            lambda f, a: f"{f}({a})", st.sampled_from(["log", "exp", "sqrt", "tanh", "sigmoid", "log1p", "abs"]), inner
        ),
        inner.map(lambda a: f"-{a}"),
    ),
    max_leaves=6,
)
P_HATS = torch.linspace(0, 1, 11)


@SETTINGS
@given(expression=EXPRESSIONS)
def test_random_psi_expressions_load_or_are_a_user_error(workdir: Path, expression: str) -> None:
    path = workdir / "psi.yaml"
    sections = {"objective": {"loss": "psipo", "psi": expression}, "data": {"columns": {"label": "p_chosen"}}}
    path.write_text(yaml.safe_dump(tiny_recipe(workdir / "run", **sections)), encoding="utf-8")
    loaded = _load_or_user_error(path)
    if loaded is None:
        return
    # Accepted: the targets on typical labels are finite and grow with p̂.
    targets = psipo_target(P_HATS, 0.1, loaded.objective.psi, loaded.objective.label_eps)
    assert targets.isfinite().all(), (expression, targets)
    assert (targets.diff() >= -1e-4 * targets.abs().max()).all(), (expression, targets)
