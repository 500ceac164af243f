"""Preference data: formats, soft labels, and every bad input a user can hand `psipo finetune`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from psipo_cli.data.pairs import load_pairs
from psipo_cli.errors import UserError
from psipo_cli.models.loading import load_tokenizer
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.recipe.schema import DataSection
from tests.conftest import TINY_DATA, assert_clean_error, write_jsonl

PLAIN = {"prompt": "What is 2 plus 2?\nAnswer:", "chosen": " It is 4.", "rejected": " It is 5."}
CHAT = {
    "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
    "chosen": [{"role": "assistant", "content": "It is 4."}],
    "rejected": [{"role": "assistant", "content": "It is 5."}],
}


@pytest.fixture(scope="module")
def tokenizer():
    from psipo_cli.recipe.schema import ModelSection
    from tests.conftest import TINY_MODEL

    return load_tokenizer(ModelSection(name_or_path=str(TINY_MODEL)))


def _load(tmp_path: Path, rows: list, tokenizer, **data) -> list[dict]:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    section = DataSection.model_validate({"train": str(path), **data})
    return load_pairs(section.train, section, tokenizer, "train").dataset.to_list()


def test_shipped_data_loads_with_both_row_formats(tokenizer) -> None:
    section = DataSection.model_validate({"train": str(TINY_DATA / "train.jsonl"), "columns": {"label": "p_chosen"}})
    pairs = load_pairs(section.train, section, tokenizer, "train")
    rows = pairs.dataset.to_list()
    assert pairs.rows_read == len(rows) == 1200
    assert any(r["prompt"].startswith("<|user|>") for r in rows) and any("Answer:" in r["prompt"] for r in rows)
    assert all(0.0 <= r["p_hat"] <= 1.0 for r in rows)


def test_chat_rows_render_through_the_template_with_eos_ending_the_response(tmp_path: Path, tokenizer) -> None:
    (row,) = _load(tmp_path, [CHAT], tokenizer)
    assert row["prompt"] == "<|user|>\nWhat is 2 plus 2?</s><|assistant|>\n"
    assert row["chosen"] == "It is 4.</s>"
    assert row["rejected"] == "It is 5.</s>"


def test_whole_conversations_split_off_their_shared_prompt(tmp_path: Path, tokenizer) -> None:
    user = {"role": "user", "content": "Hi?"}
    row = {
        "prompt": "Hi?",  # UltraFeedback repeats the prompt beside full conversations
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "Go away."}],
    }
    (out,) = _load(tmp_path, [row], tokenizer)
    assert out["prompt"].count("Hi?") == 1
    assert out["chosen"] == "Hello!</s>"


def _dialogue(*turns: str) -> str:
    """Anthropic HH-RLHF's text form: alternating Human/Assistant turns, each after a blank line."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {turn}" for i, turn in enumerate(turns))


def test_whole_dialogues_split_at_the_last_assistant_turn_they_share(tmp_path: Path, tokenizer) -> None:
    # Both responses begin "I think it is": a longest-common-prefix split would cut into them.
    one = {"chosen": _dialogue("2 plus 2?", "I think it is 4."), "rejected": _dialogue("2 plus 2?", "I think it is 5.")}
    history = ("Hi.", "Hello.", "2 plus 2?")
    multi = {"chosen": _dialogue(*history, "Four."), "rejected": _dialogue(*history, "Four, I think.")}
    rows = _load(tmp_path, [one, multi], tokenizer)
    assert rows[0] == {
        "prompt": "\n\nHuman: 2 plus 2?\n\nAssistant:",
        "chosen": " I think it is 4.</s>",
        "rejected": " I think it is 5.</s>",
    }
    assert rows[1]["prompt"] == "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: 2 plus 2?\n\nAssistant:"
    assert (rows[1]["chosen"], rows[1]["rejected"]) == (" Four.</s>", " Four, I think.</s>")


def test_dialogues_sharing_no_assistant_turn_are_bad_rows(tmp_path: Path, tokenizer) -> None:
    good = {"chosen": _dialogue("Hi?", "Hello!"), "rejected": _dialogue("Hi?", "Go away.")}
    other_prompts = {"chosen": _dialogue("Hi?", "Hello!"), "rejected": _dialogue("Bye?", "Bye!")}
    with pytest.raises(
        UserError, match=r"1 bad row\(s\): row 2: no 'prompt' column, and chosen and rejected share no "
    ):
        _load(tmp_path, [good, other_prompts], tokenizer)
    no_marker = {"chosen": "Paris.", "rejected": "London."}
    with pytest.raises(UserError, match="row 2: no 'prompt' column"):
        _load(tmp_path, [good, no_marker], tokenizer)


def test_plain_text_without_a_prompt_column_or_dialogue_is_a_missing_column(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(UserError, match=r"missing column\(s\) \['prompt'\]"):
        _load(tmp_path, [{"question": "Capital?", "chosen": "Paris.", "rejected": "London."}], tokenizer)


@pytest.mark.slow
def test_a_recipe_on_whole_dialogue_rows_trains(write_recipe, tmp_path: Path) -> None:
    from psipo_cli.training.finetune import run

    rows = [
        {
            "chosen": _dialogue(f"What is {n} plus 1?", f"It is {n + 1}."),
            "rejected": _dialogue(f"What is {n} plus 1?", "No."),
        }
        for n in range(16)
    ]
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    summary = run(load_recipe(write_recipe(data={"train": str(data)}, training={"max_steps": 2})))
    assert summary["steps"] == 2 and summary["train_pairs"] == 16
    assert math.isfinite(summary["final_train"]["loss"])


def test_votes_and_scores_become_soft_labels(tmp_path: Path, tokenizer) -> None:
    rows = _load(tmp_path, [{**PLAIN, "v": 3, "n": 4}], tokenizer, columns={"votes_chosen": "v", "votes_total": "n"})
    assert rows[0]["p_hat"] == pytest.approx(0.75)
    rows = _load(
        tmp_path,
        [{**PLAIN, "sc": 8.0, "sr": 6.0}],
        tokenizer,
        columns={"score_chosen": "sc", "score_rejected": "sr", "score_scale": 2.0},
    )
    assert rows[0]["p_hat"] == pytest.approx(1 / (1 + 2.718281828459045**-1.0))  # σ((8 − 6)/2)


def test_over_long_prompts_are_dropped_and_counted_or_refused(tmp_path: Path, tokenizer) -> None:
    long = {**PLAIN, "prompt": "word " * 200}
    path = write_jsonl(tmp_path / "d.jsonl", [PLAIN, long])
    section = DataSection.model_validate({"train": str(path), "max_length": 32})
    pairs = load_pairs(section.train, section, tokenizer, "train")
    assert len(pairs.dataset) == 1 and sum(pairs.dropped.values()) == 1
    section = DataSection.model_validate({"train": str(path), "max_length": 32, "too_long": "error"})
    with pytest.raises(UserError, match="pairs 2"):
        load_pairs(section.train, section, tokenizer, "train")


def test_many_bad_rows_report_the_first_few_and_the_total(tmp_path: Path, tokenizer) -> None:
    rows = [PLAIN] + [{**PLAIN, "rejected": PLAIN["chosen"]}] * 12
    with pytest.raises(UserError) as err:
        _load(tmp_path, rows, tokenizer)
    assert "12 bad row(s) (first 5 shown): row 2: chosen and rejected are identical; row 3" in str(err.value)


BAD_DATA = [
    ("missing", None, "data file not found"),
    ("empty", "", "no rows"),
    ("blank-lines", "\n\n", "no rows"),
    ("truncated", json.dumps(PLAIN)[:-5] + "\n", "line 1 is not valid JSON"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
    ("no-chosen-column", json.dumps({"prompt": "p", "answer": "a", "rejected": "r"}), "missing column(s) ['chosen']"),
    ("identical", json.dumps({**PLAIN, "rejected": PLAIN["chosen"]}), "row 1: chosen and rejected are identical"),
    ("null-field", json.dumps({**PLAIN, "chosen": None}), "row 1: 'chosen' is null"),
    ("empty-field", json.dumps({**PLAIN, "prompt": "  "}), "row 1: 'prompt' is empty"),
    ("number-field", json.dumps({**PLAIN, "rejected": 5}), "row 1: 'rejected' must be text"),
    ("not-an-object", json.dumps([1, 2]), "row 1: expected an object"),
    (
        "dialogues-sharing-no-turn",
        json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Bye\n\nAssistant: Yo"}),
        "row 1: no 'prompt' column, and chosen and rejected share no '\\n\\nAssistant:' turn",
    ),
]


@pytest.mark.parametrize(("name", "content", "fragment"), BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_files_fail_cleanly_and_leave_no_run(write_recipe, cli, tmp_path, name, content, fragment) -> None:
    data = tmp_path / f"{name}.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content + ("\n" if content and not content.endswith("\n") else ""), encoding="utf-8")
    recipe = write_recipe(data={"train": str(data)})
    assert_clean_error(cli("finetune", recipe), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("label", "fragment"),
    [(1.5, "must be in [0, 1]"), (-0.1, "must be in [0, 1]"), ("NaN", "must be in [0, 1]"), ("high", "a number")],
)
def test_soft_labels_outside_the_unit_interval_are_refused(write_recipe, cli, tmp_path, label, fragment) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{**PLAIN, "p": 0.7}, {**PLAIN, "p": label}])
    recipe = write_recipe(data={"train": str(data), "columns": {"label": "p"}}, objective={"loss": "psipo"})
    assert_clean_error(cli("finetune", recipe), "row 2", fragment)
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_never_overwritten_without_being_told(write_recipe, cli, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("precious")
    assert_clean_error(cli("finetune", write_recipe()), "output.dir", "--overwrite")
    assert (tmp_path / "run" / "recipe.yaml").read_text() == "precious"


def test_overwrite_refuses_to_delete_a_directory_that_is_not_a_run(write_recipe, cli, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("precious")
    assert_clean_error(cli("finetune", write_recipe(), "--overwrite"), "not a psipo run")
    assert (tmp_path / "run" / "thesis.tex").exists()


def test_output_dir_that_is_a_file_is_refused(write_recipe, cli, tmp_path) -> None:
    (tmp_path / "run").write_text("")
    assert_clean_error(cli("finetune", write_recipe()), "output.dir", "is a file")


def test_missing_model_is_a_clean_error(write_recipe, cli, tmp_path) -> None:
    recipe = write_recipe(model={"name_or_path": str(tmp_path / "no-model")})
    assert_clean_error(cli("finetune", recipe), "model.name_or_path", "not found")
    assert not (tmp_path / "run").exists()


def test_unknown_extra_columns_are_ignored_but_named_columns_are_mapped(tmp_path: Path, tokenizer) -> None:
    row = {"q": PLAIN["prompt"], "good": PLAIN["chosen"], "bad": PLAIN["rejected"], "source": "x"}
    (out,) = _load(tmp_path, [row], tokenizer, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    # Plain responses come out ending with EOS, as TRL would have appended it.
    assert out == {
        "prompt": PLAIN["prompt"],
        "chosen": PLAIN["chosen"] + "</s>",
        "rejected": PLAIN["rejected"] + "</s>",
    }


def test_recipe_data_paths_are_relative_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x.yaml").write_text("model: {name_or_path: m}\ndata: {train: d.jsonl}\noutput: {dir: o}\n")
    assert load_recipe(tmp_path / "r" / "x.yaml").data.train.path == str(tmp_path / "r" / "d.jsonl")


def test_real_process_entry_point_prints_one_line_and_exits_2(write_recipe, tmp_path) -> None:
    """`python -m psipo_cli` in a fresh interpreter: import-time library noise would show up here."""
    import subprocess
    import sys

    recipe = write_recipe(data={"train": str(tmp_path / "nope.jsonl")})
    done = subprocess.run(
        [sys.executable, "-m", "psipo_cli", "finetune", str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: data file not found"]
