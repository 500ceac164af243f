"""`psipo eval`: scores a finished run exactly as the trainer's evaluation did, and samples from it for KL."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_DATA, assert_clean_error, run_psipo, tiny_recipe, write_jsonl


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 8-step IPO run of the tiny recipe with held-out pairs, evaluated once, at its last step."""
    root = tmp_path_factory.mktemp("eval")
    recipe = tiny_recipe(
        root / "run",
        data={"eval": str(TINY_DATA / "eval.jsonl")},
        # 200 eval pairs in batches of 64: the last batch holds 8, so a mean of batch means would weigh those 8
        # pairs as much as 64 others; every logged eval metric must be the mean over pairs.
        training={
            "max_steps": 8,
            "learning_rate": 5e-3,
            "logging_steps": 4,
            "eval_steps": 8,
            "per_device_eval_batch_size": 64,
        },
    )
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert run_psipo("finetune", path, "--quiet") == 0
    return root / "run"


@pytest.fixture
def fake_run(tmp_path: Path, write_recipe) -> Path:
    """A run directory that passes `resolve_run` (recipe.yaml, adapter_config.json) but holds no weights.

    Enough for every check that must fail before a model is loaded.
    """
    from psipo_cli.recipe.loader import dump_recipe, load_recipe

    run = tmp_path / "fake-run"
    run.mkdir()
    recipe = load_recipe(write_recipe(data={"eval": str(TINY_DATA / "eval.jsonl")}))
    (run / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    (run / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _last_eval(run: Path) -> dict:
    from psipo_cli.run.directory import read_metrics

    return [m for m in read_metrics(run) if m["split"] == "eval"][-1]


@pytest.mark.slow
def test_eval_equals_the_trainers_last_evaluation(trained_run: Path, cli) -> None:
    result = cli("eval", trained_run)
    assert result.code == 0, result.err
    assert "reward accuracy" in result.out and "pairs.jsonl" in result.out
    summary = json.loads((trained_run / "eval" / "summary.json").read_text(encoding="utf-8"))
    logged = _last_eval(trained_run)
    assert logged["step"] == 8
    # Same pairs, tokenisation, batches, forward step and aggregation as the trainer's evaluation loop.
    for key in ("reward_accuracy", "loss", "target", "logratio_chosen", "logratio_rejected", "logps_chosen"):
        assert summary[key] == pytest.approx(logged[key], abs=1e-5), key
    assert summary["margin"]["mean"] == pytest.approx(logged["margin"], abs=1e-5)
    assert summary["reward_accuracy"] != 0.5  # 8 steps moved the margins: the comparison is not vacuous
    pairs = _lines(trained_run / "eval" / "pairs.jsonl")
    assert len(pairs) == summary["pairs"] == 200
    # The trainer's numbers are means over pairs, computed here from the per-pair file alone ...
    for key in ("margin", "loss"):
        values = [p[key] for p in pairs]
        assert logged[key] == pytest.approx(sum(values) / len(values), abs=1e-5), key
        # ... and the batch size does not divide the data, so a mean of batch means would be told apart.
        batch_means = [statistics.fmean(values[i : i + 64]) for i in range(0, len(values), 64)]
        assert statistics.fmean(batch_means) != pytest.approx(logged[key], abs=1e-5), key
    margins = [p["margin"] for p in pairs]
    assert sum(margins) / len(margins) == pytest.approx(summary["margin"]["mean"], abs=1e-9)
    assert sum(m > 0 for m in margins) / len(margins) == summary["reward_accuracy"]
    first = pairs[0]
    h = (first["policy_chosen"] - first["ref_chosen"]) - (first["policy_rejected"] - first["ref_rejected"])
    assert first["margin"] == pytest.approx(h, abs=1e-6)
    assert summary["margin"]["p10"] <= summary["margin"]["p50"] <= summary["margin"]["p90"]

    again = cli("eval", trained_run)  # never replaces results unless told
    assert_clean_error(again, "exists; pass --overwrite")


def _zero_lora_b(run: Path, into: Path) -> Path:
    """A copy of `run` whose adapter is as PEFT initialises it: A random, B = 0, so π = π_ref exactly."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, into, ignore=shutil.ignore_patterns("checkpoint-*", "eval"))
    weights = load_file(into / "adapter_model.safetensors")
    zeroed = {k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}
    assert any("lora_B" in k for k in zeroed) and any("lora_A" in k for k in zeroed)
    save_file(zeroed, into / "adapter_model.safetensors")
    return into


@pytest.mark.slow
def test_an_adapter_at_its_initialisation_has_no_drift_and_no_kl(trained_run: Path, tmp_path: Path, cli) -> None:
    fresh = _zero_lora_b(trained_run, tmp_path / "fresh")
    result = cli("eval", fresh, "--generate", "2", "--prompts", "3", "--max-new-tokens", "8", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["logratio_chosen"] == 0.0 and summary["logratio_rejected"] == 0.0
    assert summary["reward_accuracy"] == 0.0  # h = 0 exactly: no pair counts as ranked right
    assert summary["loss"] == pytest.approx(1.0)  # IPO at h = 0: (0 − 1/(2·0.5))²
    for pair in _lines(fresh / "eval" / "pairs.jsonl"):
        assert pair["policy_chosen"] == pair["ref_chosen"] and pair["policy_rejected"] == pair["ref_rejected"]
        assert pair["margin"] == 0.0
    generation = summary["generation"]
    assert generation["kl_policy_reference"] == 0.0 and generation["kl_reference_policy"] == 0.0


@pytest.mark.slow
def test_generate_estimates_kl_and_response_lengths(trained_run: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "gen.jsonl"
    args = ("eval", trained_run, "--generate", "2", "--prompts", "3", "--max-new-tokens", "6", "--out", out)
    result = cli(*args)
    assert result.code == 0, result.err
    assert "KL(π‖π_ref)" in result.out
    summary = json.loads((tmp_path / "gen.summary.json").read_text(encoding="utf-8"))
    generation = summary["generation"]
    assert generation["prompts"] == 3 and generation["samples_per_prompt"] == 2
    for direction in ("kl_policy_reference", "kl_reference_policy"):
        # 6 samples of a policy 8 small steps from its reference: near 0, Monte Carlo noise either side.
        assert math.isfinite(generation[direction]) and generation[direction] > -1.0
    for who in ("policy", "reference"):
        assert 1 <= generation[f"{who}_length_mean"] <= 6
        assert 1 <= generation[f"{who}_length_median"] <= 6
        assert 0.0 <= generation[f"{who}_ended_with_eos"] <= 1.0
    assert len(_lines(out)) == 200

    rerun = cli(*args, "--overwrite")  # the seed is fixed: the same samples again
    assert rerun.code == 0, rerun.err
    assert json.loads((tmp_path / "gen.summary.json").read_text(encoding="utf-8"))["generation"] == generation


@pytest.mark.slow
def test_overrides_and_other_data_use_the_runs_pipeline(trained_run: Path, tmp_path: Path, cli) -> None:
    rows = [json.loads(line) for line in (TINY_DATA / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:5]]
    data = write_jsonl(tmp_path / "five.jsonl", rows)
    as_trained = cli("eval", trained_run, "--data", data, "--out", tmp_path / "a.jsonl", "--json")
    retuned = cli("eval", trained_run, "objective.tau=0.25", "--data", data, "--out", tmp_path / "b.jsonl", "--json")
    assert as_trained.code == 0 and retuned.code == 0, (as_trained.err, retuned.err)
    before, after = json.loads(as_trained.out), json.loads(retuned.out)
    assert before["pairs"] == after["pairs"] == 5
    assert (before["target"], after["target"]) == pytest.approx((1.0, 2.0))  # IPO's 1/(2τ), τ overridden
    assert after["objective"]["tau"] == 0.25
    # τ changes the target and the loss, not the policy: the margins are the same pair for pair.
    margins = [[p["margin"] for p in _lines(tmp_path / name)] for name in ("a.jsonl", "b.jsonl")]
    assert margins[0] == margins[1]
    assert after["loss"] != pytest.approx(before["loss"])


@pytest.mark.slow
def test_a_run_started_from_an_adapter_is_measured_against_that_adapter(trained_run: Path, tmp_path: Path, cli) -> None:
    # Pretend the run started from its own final adapter: reference and policy are then the same weights.
    out = tmp_path / "self.jsonl"
    result = cli("eval", trained_run, f"adapter.init_from={trained_run}", "--out", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["reference"].startswith("starting adapter")
    assert all(p["margin"] == 0.0 for p in _lines(out))

    gone = cli("eval", trained_run, f"adapter.init_from={tmp_path / 'nowhere'}", "--out", tmp_path / "x.jsonl")
    assert_clean_error(gone, "adapter.init_from", "starting adapter")
    assert not (tmp_path / "x.jsonl").exists()


def test_missing_run_directory_is_a_clean_error(tmp_path: Path, cli) -> None:
    assert_clean_error(cli("eval", tmp_path / "no-such-run"), "no such run directory")


def test_no_eval_data_names_the_data_option(fake_run: Path, cli) -> None:
    assert_clean_error(cli("eval", fake_run, "data.eval="), "data.eval", "--data")


def test_bad_override_key_is_a_clean_error(fake_run: Path, cli) -> None:
    assert_clean_error(cli("eval", fake_run, "objective.tua=0.1"), "objective.tua", "objective.tau")


def test_existing_output_needs_overwrite(fake_run: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    assert_clean_error(cli("eval", fake_run, "--out", out), "exists", "--overwrite")
    assert out.read_text(encoding="utf-8") == "keep me\n"
    (fake_run / "eval").mkdir()
    (fake_run / "eval" / "summary.json").write_text("{}", encoding="utf-8")
    assert_clean_error(cli("eval", fake_run), "summary.json", "--overwrite")


def test_output_must_be_jsonl(fake_run: Path, tmp_path: Path, cli) -> None:
    assert_clean_error(cli("eval", fake_run, "--out", tmp_path / "results.csv"), "--out", ".jsonl")


def test_reward_model_runs_point_at_label(fake_run: Path, cli) -> None:
    assert_clean_error(cli("eval", fake_run, "objective.loss=reward"), "objective.loss", "psipo label")
