"""The bad-input corpus: every hostile or broken recipe, override and data file we know of, run through the real
`psipo finetune`. Each must end in exit code 2 and one `error:` line naming the key, file or row, with no
traceback and no run directory left behind. All of them fail before the model is loaded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_DATA, assert_clean_error, tiny_recipe, write_jsonl

Maker = Callable[[Path], list[str]]  # writes what a case needs under tmp; returns the arguments after `finetune`

PLAIN = {"prompt": "What is 2 plus 2?\nAnswer:", "chosen": " It is 4.", "rejected": " It is 5."}
SOFT = {"data": {"columns": {"label": "p"}}, "objective": {"loss": "psipo"}}


def _write_recipe(tmp: Path, name: str = "recipe.yaml", **sections: dict[str, Any]) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / "run", **sections)), encoding="utf-8")
    return path


def recipe(*overrides: str, **sections: Any) -> Maker:
    """The tiny demo recipe with `sections` merged in, plus command-line overrides."""
    return lambda tmp: [str(_write_recipe(tmp, **sections)), *overrides]


def text(content: str | bytes, drop: tuple[str, ...] = ()) -> Maker:
    """A recipe file holding `content`; with `drop`, a valid recipe without those sections followed by `content`."""

    def make(tmp: Path) -> list[str]:
        path = tmp / "recipe.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
            return [str(path)]
        base = {k: v for k, v in tiny_recipe(tmp / "run").items() if k not in drop}
        path.write_text((yaml.safe_dump(base) if drop else "") + content, encoding="utf-8")
        return [str(path)]

    return make


def data(content: list[Any] | str | bytes | None, suffix: str = ".jsonl", **sections: Any) -> Maker:
    """A data file (rows as jsonl, raw text or bytes; None: no file) used as data.train of the tiny recipe."""

    def make(tmp: Path) -> list[str]:
        path = tmp / f"pairs{suffix}"
        if isinstance(content, list):
            write_jsonl(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        merged = {**sections, "data": {**sections.get("data", {}), "train": str(path)}}
        return [str(_write_recipe(tmp, **merged))]

    return make


def parquet(rows: list[dict[str, Any]]) -> Maker:
    def make(tmp: Path) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return [str(_write_recipe(tmp, data={"train": str(path)}))]

    return make


def extends_cycle(tmp: Path) -> list[str]:
    _write_recipe(tmp, "a.yaml", extends="b.yaml")
    (tmp / "b.yaml").write_text("extends: a.yaml\n", encoding="utf-8")
    return [str(tmp / "a.yaml")]


def output_is_a_file(tmp: Path) -> list[str]:
    (tmp / "run").write_text("not a directory", encoding="utf-8")
    return [str(_write_recipe(tmp))]


def recipe_is_a_directory(tmp: Path) -> list[str]:
    (tmp / "recipes.yaml").mkdir()
    return [str(tmp / "recipes.yaml")]


def data_is_a_directory(tmp: Path) -> list[str]:
    (tmp / "pairs.jsonl").mkdir()
    return [str(_write_recipe(tmp, data={"train": str(tmp / "pairs.jsonl")}))]


def _rows(n: int, **change: Any) -> list[dict[str, Any]]:
    """n good rows, then one with `change` applied (so the bad row is row n + 1)."""
    return [{**PLAIN, "p": 0.8}] * n + [{**PLAIN, "p": 0.8, **change}]


# A billion leaves that YAML builds as nine shared lists: harmless unless something walks or prints it in full.
ALIAS_BOMB = "description:\n  - &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  - &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)
CHAT_ROLE = [{"role": 3, "content": "Hi?"}]
TRUNCATED = json.dumps(PLAIN) + "\n" + json.dumps(PLAIN)[:-7] + "\n"

CASES: list[tuple[str, Maker, tuple[str, ...]]] = [
    # --- the recipe file itself
    ("recipe-missing", lambda tmp: [str(tmp / "nope.yaml")], ("nope.yaml", "recipe file not found")),
    ("recipe-directory", recipe_is_a_directory, ("recipes.yaml", "not a file")),
    ("recipe-empty", text(""), ("recipe is empty",)),
    ("recipe-list", text("- model\n- data\n"), ("must be a mapping",)),
    ("recipe-scalar", text("just words\n"), ("must be a mapping",)),
    ("recipe-binary", text(b"\xff\xfe\x00junk"), ("not UTF-8",)),
    ("yaml-malformed", text("model: [unclosed\n"), ("recipe.yaml", "invalid YAML")),
    ("yaml-tab-indent", text("model:\n\tname_or_path: x\n"), ("invalid YAML: line 2",)),
    ("yaml-duplicate-key", text("objective:\n  tau: 1\n  tau: 2\n", drop=("objective",)), ("duplicate key 'tau'",)),
    ("yaml-python-tag", text("!!python/object/apply:os.system ['echo pwned']\n"), ("invalid YAML",)),
    ("yaml-deep-nesting", text("a: " + "[" * 3000 + "]" * 3000 + "\n"), ("recipe.yaml", "nests too deeply")),
    ("yaml-alias-bomb", text(ALIAS_BOMB, drop=("description",)), ("description", "valid string")),
    ("extends-cycle", extends_cycle, ("extends cycle: a.yaml -> b.yaml -> a.yaml",)),
    ("extends-missing", recipe(extends="base.yaml"), ("extends", "base recipe 'base.yaml' not found")),
    ("extends-not-a-path", recipe(extends=3), ("extends must be a path", "got 3")),
    # --- unknown keys, at every level
    ("unknown-top", recipe(modle={}), ("modle: unknown key", "did you mean 'model'")),
    ("unknown-model", recipe(model={"nme": "x"}), ("model.nme: unknown key",)),
    ("unknown-adapter", recipe(adapter={"rank": 8}), ("adapter.rank: unknown key",)),
    ("unknown-data", recipe(data={"trian": "x.jsonl"}), ("data.trian: unknown key", "did you mean 'data.train'")),
    ("unknown-columns", recipe(data={"columns": {"lable": "p"}}), ("data.columns.lable", "data.columns.label")),
    ("unknown-objective", recipe(objective={"taw": 1}), ("objective.taw: unknown key", "'objective.tau'")),
    ("unknown-training", recipe(training={"learning_rat": 1}), ("training.learning_rat: unknown key",)),
    ("unknown-distributed", recipe(distributed={"stratgy": "ddp"}), ("distributed.stratgy: unknown key",)),
    ("unknown-output", recipe(output={"folder": "x"}), ("output.folder: unknown key",)),
    # --- wrong types and out-of-range values
    ("type-str-for-int", recipe(training={"max_steps": "ten"}), ("training.max_steps", "integer", "'ten'")),
    ("type-list-for-float", recipe(objective={"tau": [0.1, 0.2]}), ("objective.tau", "number")),
    ("type-bool-for-str", recipe(model={"name_or_path": True}), ("model.name_or_path", "string")),
    ("type-section-scalar", recipe(training=5), ("training",)),
    ("tau-zero", recipe(objective={"tau": 0}), ("objective.tau", "greater than 0")),
    ("tau-negative", recipe(objective={"tau": -0.5}), ("objective.tau", "greater than 0")),
    ("lr-zero", recipe(training={"learning_rate": 0}), ("training.learning_rate", "greater than 0")),
    ("lr-negative", recipe(training={"learning_rate": -1e-5}), ("training.learning_rate", "greater than 0")),
    ("batch-zero", recipe(training={"per_device_train_batch_size": 0}), ("training.per_device_train_batch_size",)),
    ("loss-unknown", recipe(objective={"loss": "kto"}), ("objective.loss", "'kto'")),
    ("psi-unknown", recipe(objective={"loss": "psipo", "psi": "cube"}), ("objective.psi", "unknown Ψ 'cube'")),
    (
        "psi-unsafe",
        recipe(objective={"loss": "psipo", "psi": "__import__('os').system('touch pwned')"}),
        ("objective.psi", "only calls of log"),
    ),
    ("psi-decreasing", recipe(objective={"loss": "psipo", "psi": "1 - q"}), ("objective.psi", "non-decreasing")),
    # --- overrides
    ("override-unknown-key", recipe("objective.tua=1"), ("objective.tua: unknown key", "'objective.tau'")),
    ("override-unparsable", recipe("objective.tau=[1"), ("objective.tau", "cannot parse")),
    ("override-no-equals", recipe("objective.tau"), ("objective.tau", "key.path=value")),
    ("override-empty-key", recipe("=1"), ("key.path=value",)),
    (
        "packing-without-sharing",
        recipe("training.pack_tokens=256", "training.prefix_sharing=false"),
        ("training.pack_tokens", "prefix_sharing: auto or true"),
    ),
    ("packing-too-small", recipe("training.pack_tokens=4"), ("training.pack_tokens", "greater than or equal to 8")),
    ("packing-a-reward-model", recipe("training.pack_tokens=256", "objective.loss=reward"), ("has none",)),
    ("override-into-scalar", recipe("objective.tau.x=1"), ("'objective.tau' has no sub-keys",)),
    ("override-bad-value", recipe("training.max_steps=many"), ("training.max_steps", "integer")),
    # --- data files
    ("data-missing", data(None), ("pairs.jsonl", "data file not found")),
    ("data-directory", data_is_a_directory, ("pairs.jsonl", "expected a data file")),
    ("data-unsupported-type", data("x", suffix=".txt"), ("pairs.txt", "unsupported data file type")),
    ("data-empty", data(""), ("data.train", "pairs.jsonl", "no rows")),
    ("data-truncated", data(TRUNCATED), ("pairs.jsonl", "line 2 is not valid JSON", "column")),
    ("data-binary", data(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10), ("pairs.jsonl", "not UTF-8")),
    ("data-deep-nesting", data("[" * 100_000 + "]" * 100_000 + "\n"), ("pairs.jsonl", "line 1", "nests too deeply")),
    ("data-json-not-list", data('{"prompt": "p"}', suffix=".json"), ("pairs.json", "must hold a list")),
    (
        "data-csv-huge-field",
        data("prompt,chosen,rejected\n" + "x" * 200_000 + ",a,b\n", suffix=".csv"),
        ("pairs.csv", "no usable pairs left"),
    ),
    ("parquet-wrong-schema", parquet([{"question": "q", "answer": "a"}]), ("pairs.parquet", "missing column(s)")),
    ("column-missing", data([{"prompt": "p", "answer": "a", "rejected": "r"}]), ("missing column(s) ['chosen']",)),
    ("column-missing-later", data([PLAIN, {"prompt": "p", "chosen": "c"}]), ("row 2: 'rejected' is missing",)),
    ("label-column-missing", data([PLAIN], **SOFT), ("missing column(s) ['p']", "data.columns")),
    ("field-null", data(_rows(1, chosen=None)), ("row 2: 'chosen' is null",)),
    ("field-empty", data(_rows(2, prompt="")), ("row 3: 'prompt' is empty",)),
    ("field-number", data(_rows(1, chosen=42)), ("row 2: 'chosen' must be text", "got int")),
    ("field-bad-role", data(_rows(1, prompt=CHAT_ROLE)), ("row 2: 'prompt' must be text",)),
    ("chosen-equals-rejected", data(_rows(1, rejected=PLAIN["chosen"])), ("row 2: chosen and rejected are identical",)),
    ("label-above-one", data(_rows(1, p=1.5), **SOFT), ("row 2: label 'p' must be in [0, 1]", "1.5")),
    ("label-below-zero", data(_rows(1, p=-0.1), **SOFT), ("row 2: label 'p' must be in [0, 1]",)),
    ("label-nan", data(_rows(1, p=float("nan")), **SOFT), ("row 2: label 'p' must be in [0, 1]", "nan")),
    ("label-huge-int", data(_rows(1, p=10**400), **SOFT), ("row 2: label 'p' must be a number", "...")),
    (
        "votes-infinite",
        data(
            [{**PLAIN, "v": 8, "n": 10}, {**PLAIN, "v": float("inf"), "n": 10}],
            data={"columns": {"votes_chosen": "v", "votes_total": "n"}},
            objective={"loss": "psipo"},
        ),
        ("row 2", "votes"),
    ),
    (
        "prompt-too-long",
        data(_rows(1, prompt="word " * 200), data={"too_long": "error"}),
        ("data.train", "1 prompt(s) fill data.max_length=64", "pairs 2"),
    ),
    ("eval-broken", recipe(data={"eval": "missing-eval.jsonl"}), ("missing-eval.jsonl", "data file not found")),
    # --- model and output
    ("model-dir-missing", recipe(model={"name_or_path": "./no-such-model"}), ("model.name_or_path", "not found")),
    ("output-dir-is-a-file", output_is_a_file, ("output.dir", "is a file")),
]


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line_and_leaves_nothing(tmp_path: Path, cli, make: Maker, expect: tuple) -> None:
    run = tmp_path / "run"
    args = make(tmp_path)
    was_file = run.is_file()  # the one case that sets output.dir up, as a file
    result = cli("finetune", *args)
    assert_clean_error(result, *expect)
    assert "Traceback" not in result.out + result.err
    if was_file:
        assert run.read_text(encoding="utf-8") == "not a directory"
    else:
        assert not run.exists()


def test_the_corpus_covers_enough_cases() -> None:
    assert len(CASES) >= 35 and len({c[0] for c in CASES}) == len(CASES)


def test_a_large_file_names_the_first_bad_rows_and_the_total(tmp_path: Path, cli) -> None:
    bad_rows = list(range(100, 5001, 125))  # 40 rows, 1-based
    rows = [{**PLAIN, "prompt": f"Question {i}?"} for i in range(1, 5001)]
    for number in bad_rows:
        rows[number - 1] = {**rows[number - 1], "rejected": PLAIN["chosen"]}
    recipe_path = data(rows)(tmp_path)
    result = cli("finetune", *recipe_path)
    assert_clean_error(result, "data.train", "pairs.jsonl", "40 bad row(s) (first 5 shown)")
    line = result.err.strip()
    shown = [f"row {n}: chosen and rejected are identical" for n in bad_rows[:5]]
    assert all(s in line for s in shown) and "row 725" not in line, line
    assert not (tmp_path / "run").exists()


def test_too_long_drop_trains_on_the_rest_and_counts_what_it_dropped(tmp_path: Path, cli) -> None:
    lines = (TINY_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    rows = [json.loads(line) for line in lines] + [{**PLAIN, "prompt": "word " * 200}] * 3
    recipe_path = data(rows, data={"too_long": "drop"})(tmp_path)
    result = cli("finetune", *recipe_path, "training.max_steps=1")
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["dropped_pairs"] == {"prompt >= max_length (64 tokens)": 3}
    assert summary["train_pairs"] == 16
    assert "dropped" in result.out and "3 pairs" in result.out, result.out
