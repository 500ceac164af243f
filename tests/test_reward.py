"""Bradley–Terry reward model (eq. 4–5) on the tiny model, and `psipo label` closing the ΨPO loop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset
from transformers import AutoTokenizer
from trl import RewardTrainer

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.run.directory import read_metrics
from psipo_cli.training.finetune import build_trainer, prepare, run
from tests.conftest import RECIPES, TINY_DATA, TINY_MODEL, assert_clean_error, tiny_recipe, write_jsonl

pytestmark = pytest.mark.slow

EVAL = TINY_DATA / "eval.jsonl"


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("rm") / "run"
    # One evaluation batch of all 200 held-out pairs, so the logged accuracy is exactly the share of pairs.
    recipe = load_recipe(RECIPES / "tiny-reward.yaml", [f"output.dir={out}", "training.per_device_eval_batch_size=200"])
    return run(recipe), out


def test_reward_model_beats_chance_on_held_out_pairs(reward_run) -> None:
    summary, run_dir = reward_run
    assert summary["final_eval"]["reward_accuracy"] > 0.6  # chance is 0.5; measured 0.63 (seed 0)
    assert "Bradley–Terry" in summary["reference"]
    first, last = (m["loss"] for m in (read_metrics(run_dir)[0], summary["final_train"]))
    assert last < first


def test_labels_are_soft_and_agree_with_the_logged_accuracy(reward_run, cli, tmp_path: Path) -> None:
    summary, run_dir = reward_run
    out = tmp_path / "eval-labelled.jsonl"
    result = cli("label", run_dir, EVAL, "--out", out)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in EVAL.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "p_hat"} for r in rows] == originals  # data written back as it was
    labels = [r["p_hat"] for r in rows]
    assert all(0.0 < p < 1.0 for p in labels)
    assert len(set(labels)) > 100, "genuinely soft: one label per pair"
    # The scoring path of `psipo label` and the trainer's evaluation agree pair by pair.
    agreement = sum(p > 0.5 for p in labels) / len(labels)
    assert agreement == pytest.approx(summary["final_eval"]["reward_accuracy"], abs=1e-6)  # logged in float32


def test_psipo_trains_on_reward_model_labels(reward_run, cli, tmp_path: Path) -> None:
    _, run_dir = reward_run
    subset = tmp_path / "train64.jsonl"
    subset.write_text("\n".join((TINY_DATA / "train.jsonl").read_text().splitlines()[:64]) + "\n")
    labelled = tmp_path / "train64-labelled.jsonl"
    assert cli("label", run_dir, subset, "--out", labelled).code == 0
    sections = {
        "data": {"train": str(labelled), "columns": {"label": "p_hat"}},
        "objective": {"loss": "psipo", "psi": "logit", "tau": 1.0},
        "training": {"max_steps": 12, "per_device_train_batch_size": 64, "logging_steps": 1},
    }
    path = tmp_path / "psipo.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "psipo-run", **sections)))
    summary = run(load_recipe(path))
    logs = [m for m in read_metrics(Path(summary["run_dir"])) if m["split"] == "train"]
    labels = [json.loads(line)["p_hat"] for line in labelled.read_text().splitlines()]
    clipped = [min(max(p, 0.01), 0.99) for p in labels]  # logit Ψ clips p̂ into [ε, 1 − ε], ε = label_eps
    expected_target = sum(math.log(p / (1 - p)) for p in clipped) / len(clipped)  # logit(p̂)/τ, τ = 1
    assert logs[0]["target"] == pytest.approx(expected_target, rel=1e-4)
    assert logs[-1]["loss"] < logs[0]["loss"]


def _plain_rows(path: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if isinstance(r["prompt"], str)][:count]


def test_reward_training_keeps_over_long_pairs_truncated_and_counts_them(write_recipe, tmp_path: Path) -> None:
    """TRL's RewardTrainer would silently drop pairs over max_length; psipo cuts them to it, as `psipo label` does."""
    rows = _plain_rows(TINY_DATA / "train.jsonl", 64)
    data = write_jsonl(tmp_path / "plain64.jsonl", rows)
    sections = {"objective": {"loss": "reward"}, "data": {"train": str(data), "max_length": 20}}
    recipe = load_recipe(write_recipe(**sections, training={"max_steps": 2}))
    # TRL's own tokenisation of the pairs, without its length filter: what the reward model would see uncut.
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    texts = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    no_limit = SimpleNamespace(dataset_num_proc=None, max_length=None)
    uncut = RewardTrainer._prepare_dataset(None, texts, tokenizer, no_limit, "t")
    too_long = sum(max(len(r["chosen_ids"]), len(r["rejected_ids"])) > 20 for r in uncut)
    assert too_long == 20, "measured on these 64 pairs: the test needs some, not all, pairs over max_length"

    trained_on = build_trainer(prepare(recipe)).train_dataset
    assert len(trained_on) == len(rows), "no pair dropped"
    for seen, full in zip(trained_on, uncut, strict=True):
        assert seen["chosen_ids"] == full["chosen_ids"][:20] and seen["rejected_ids"] == full["rejected_ids"][:20]

    summary = run(recipe)
    assert summary["train_pairs"] == 64 and summary["truncated_pairs"] == too_long
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["truncated_pairs"] == too_long


FILLER = " Also: " + ", ".join(str(n) for n in range(40))  # ~100 tokens, far past the run's max_length of 64


def test_label_scores_over_long_pairs_as_trained_cut_to_max_length(reward_run, cli, tmp_path: Path) -> None:
    _, run_dir = reward_run
    short = _plain_rows(EVAL, 3)
    long = [{**r, "chosen": r["chosen"] + FILLER, "rejected": r["rejected"] + FILLER} for r in short]
    longer = [{**r, "chosen": r["chosen"] + " and more", "rejected": r["rejected"] + " or so"} for r in long]
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    for a, b in zip(long, longer, strict=True):  # the test's premise: they differ only after the first 64 tokens
        first, second = (tokenizer(r["prompt"] + r["chosen"])["input_ids"] for r in (a, b))
        assert first[:64] == second[:64] and len(first) > 64
    data = write_jsonl(tmp_path / "long.jsonl", short + long + longer)
    out = tmp_path / "labelled.jsonl"
    result = cli("label", run_dir, data, "--out", out)
    assert result.code == 0, result.err
    labels = [json.loads(line)["p_hat"] for line in out.read_text().splitlines()]
    assert len(labels) == 9, "every pair labelled, none dropped"
    assert labels[3:6] == labels[6:9], "the reward model sees the first max_length tokens, as in training"
    assert labels[3:6] != labels[:3]
    assert "6 pairs cut to data.max_length=64 tokens" in result.out, result.out


def test_label_refuses_a_run_that_is_not_a_reward_model(write_recipe, cli, tmp_path: Path) -> None:
    recipe = write_recipe()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.read_text())
    assert_clean_error(cli("label", tmp_path / "run", EVAL, "--out", tmp_path / "x.jsonl"), "not a reward model")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["nowhere", str(EVAL), "--out", "x.jsonl"], "no such run directory or recipe"),
        ([".", str(EVAL), "--out", "x.csv"], "use a .jsonl name"),
    ],
)
def test_label_bad_arguments_fail_cleanly(cli, tmp_path: Path, monkeypatch, args, fragment) -> None:
    monkeypatch.chdir(tmp_path)
    assert_clean_error(cli("label", *args), fragment)


def test_label_never_overwrites_without_being_told(reward_run, cli, tmp_path: Path) -> None:
    _, run_dir = reward_run
    out = tmp_path / "l.jsonl"
    out.write_text("precious\n")
    assert_clean_error(cli("label", run_dir, EVAL, "--out", out), "--overwrite")
    assert out.read_text() == "precious\n"
