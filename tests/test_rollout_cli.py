"""The sampling stages through `psipo finetune`: real short runs, and bad input refused in one line with nothing
written (a reward path that is not a reward run, another base model or tokenizer, prompts missing, settings the
algorithm cannot run with)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from psipo_cli.run.directory import read_metrics
from tests.conftest import TINY_MODEL, assert_clean_error, rollout_sections, tiny_recipe, write_jsonl


def _write(tmp_path: Path, reward_dir: Path, loss: str = "rlhf", rollout: dict | None = None, **sections: Any) -> Path:
    merged = rollout_sections(reward_dir, loss, **(rollout or {}))
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", **merged)), encoding="utf-8")
    return path


CASES = {
    "rlhf": ("rlhf", {"responses_per_prompt": 3, "clip_epsilon": 0.1, "iterations": 2}),
    "online-ipo": ("online_psipo", {}),
    "ipo-md-bernoulli": ("online_psipo", {"mixture": 0.5, "label": "bernoulli"}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_sampling_run_trains_logs_and_saves(cli, tmp_path: Path, reward_run: Path, case: str) -> None:
    loss, rollout = CASES[case]
    result = cli("finetune", _write(tmp_path, reward_run, loss, rollout))
    assert result.code == 0, result.err
    run_dir = tmp_path / "run"
    train = [m for m in read_metrics(run_dir) if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    # Sampling steps log the samples' reward and KL; with rollout.iterations 2, step 2 reuses step 1's samples.
    assert {"loss", "reward", "kl_sequence", "completions/mean_length"} <= train[0].keys()
    assert ("reward" in train[1]) == (rollout.get("iterations", 1) == 1)
    assert train[0]["kl_sequence"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples the reference itself
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def _fake_reward_run(reward_run: Path, tmp_path: Path, base: Path) -> Path:
    """A copy of the reward run whose recipe names another base model (nothing is loaded before the check)."""
    fake = tmp_path / "fake-reward"
    shutil.copytree(reward_run, fake, ignore=shutil.ignore_patterns("checkpoint-*", "plots"))
    recipe = yaml.safe_load((fake / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = str(base)
    (fake / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return fake


def test_another_base_model_is_refused(cli, tmp_path: Path, reward_run: Path) -> None:
    other = tmp_path / "other-llama"
    shutil.copytree(TINY_MODEL, other)  # the same tokenizer, another model
    fake = _fake_reward_run(reward_run, tmp_path, other)
    result = cli("finetune", _write(tmp_path, fake))
    assert_clean_error(result, "rollout.reward_model", "trained on", "one base model")
    assert not (tmp_path / "run").exists()


def test_a_reward_model_trained_on_shorter_texts_is_refused(cli, tmp_path: Path, reward_run: Path) -> None:
    fake = _fake_reward_run(reward_run, tmp_path, TINY_MODEL)
    recipe = yaml.safe_load((fake / "recipe.yaml").read_text())
    recipe["data"]["max_length"] = 32
    (fake / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert_clean_error(cli("finetune", _write(tmp_path, fake)), "rollout.reward_model", "data.max_length=32")
    assert not (tmp_path / "run").exists()


def test_another_tokenizer_is_refused(cli, tmp_path: Path, reward_run: Path) -> None:
    other = tmp_path / "other-llama"
    shutil.copytree(TINY_MODEL, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text() + "{# another template #}")
    result = cli("finetune", _write(tmp_path, _fake_reward_run(reward_run, tmp_path, other)))
    assert_clean_error(result, "rollout.reward_model", "tokenizer differs")
    assert not (tmp_path / "run").exists()


def test_a_reward_path_that_is_not_a_reward_run_is_refused(cli, tmp_path: Path, reward_run: Path) -> None:
    assert_clean_error(cli("finetune", _write(tmp_path, tmp_path / "nowhere")), "rollout.reward_model", "no such run")
    policy_run = _fake_reward_run(reward_run, tmp_path, TINY_MODEL)
    recipe = yaml.safe_load((policy_run / "recipe.yaml").read_text())
    recipe["objective"] = {"loss": "ipo"}
    (policy_run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert_clean_error(cli("finetune", _write(tmp_path, policy_run)), "rollout.reward_model", "not a reward model")
    (policy_run / "adapter_config.json").unlink()
    recipe["objective"] = {"loss": "reward"}
    (policy_run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert_clean_error(cli("finetune", _write(tmp_path, policy_run)), "rollout.reward_model", "not finished")
    assert not (tmp_path / "run").exists()


def test_prompts_come_from_pairs_or_a_prompt_only_file(tmp_path: Path, reward_run: Path) -> None:
    from psipo_cli.recipe.loader import load_recipe
    from psipo_cli.training.finetune import prepare

    rows = [
        {"prompt": "Name a colour.\nAnswer:"},
        {"prompt": [{"role": "user", "content": "Name a fruit."}]},
        {"prompt": "Name a colour.\nAnswer:"},  # repeated: sampled from once per pass
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}],
        },
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    prepared = prepare(load_recipe(_write(tmp_path, reward_run, data={"train": str(data)})))
    prompts = prepared.train.dataset["prompt"]
    assert len(prompts) == 3 and prompts[0] == "Name a colour.\nAnswer:"
    tokenizer = prepared.tokenizer
    rendered = tokenizer.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True, tokenize=False)
    assert prompts[1] == rendered.removeprefix(tokenizer.bos_token)  # the BOS the tokenizer adds is not doubled
    assert prompts[2].endswith("<|assistant|>\n") and "Hi" in prompts[2]  # the implicit prompt of a conversation
    assert prepared.train.dropped == {"repeated prompt (each is sampled from once per pass)": 1}


def test_data_without_prompts_and_prompts_too_long_are_refused(cli, tmp_path: Path, reward_run: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "where is the prompt?"}])
    result = cli("finetune", _write(tmp_path, reward_run, data={"train": str(data)}))
    assert_clean_error(result, "data.train", "row 2", "'prompt' is missing")
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 60}])
    result = cli("finetune", _write(tmp_path, reward_run, data={"train": str(long), "too_long": "error"}))
    assert_clean_error(result, "data.train", "rollout.max_new_tokens=8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("loss", "rollout", "extra", "fragment"),
    [
        ("rlhf", None, {}, "rollout: objective.loss: rlhf needs the reward model"),
        (
            "online_psipo",
            {"responses_per_prompt": 4},
            {},
            "rollout.responses_per_prompt: online_psipo samples one pair",
        ),
        ("rlhf", {"mixture": 0.5}, {}, "rollout.mixture: applies to online_psipo only"),
        ("online_psipo", {"clip_epsilon": 0.1}, {}, "rollout.clip_epsilon: applies to rlhf only"),
        ("rlhf", {"max_new_tokens": 64}, {}, "rollout.max_new_tokens: must leave room"),
        ("rlhf", {}, {"objective": {"precompute_ref_log_probs": True}}, "objective.precompute_ref_log_probs"),
        ("rlhf", {}, {"training": {"prefix_sharing": True}}, "training.prefix_sharing: prefix sharing lays out"),
        ("rlhf", {}, {"objective": {"logps": "mean"}}, "objective.logps: rlhf's KL"),
        ("online_psipo", {"label": "bernoulli"}, {"objective": {"psi": "logit"}}, "rollout.label: a non-linear Ψ"),
        ("rlhf", {"temperature": "hot"}, {}, "rollout.temperature"),
        ("rlhf", {}, {"objective": {"psi": "logit"}}, "objective.psi: rlhf has no Ψ"),
        ("online_psipo", {}, {"data": {"columns": {"label": "p"}}}, "data.columns: the sampling stages label"),
        ("online_psipo", {}, {"adapter": {"dropout": 0.1}}, "adapter.dropout: must be 0 for the sampling stages"),
        ("rlhf", {"reward_modle": "x"}, {}, "did you mean 'rollout.reward_model'"),
    ],
)
def test_settings_the_stages_cannot_run_with_are_recipe_errors(
    cli, tmp_path: Path, reward_run: Path, loss: str, rollout: dict | None, extra: dict, fragment: str
) -> None:
    path = _write(tmp_path, reward_run, loss, rollout, **extra)
    if rollout is None:
        raw = yaml.safe_load(path.read_text())
        del raw["rollout"]
        path.write_text(yaml.safe_dump(raw))
    assert_clean_error(cli("validate", path), fragment)


def test_a_rollout_section_on_a_preference_recipe_is_an_error(cli, write_recipe) -> None:
    path = write_recipe(rollout={"reward_model": "runs/x"})
    assert_clean_error(cli("validate", path), "rollout: applies to objective.loss rlhf and online_psipo only")


def test_a_reward_model_retrained_in_place_changes_the_runs_fingerprint(tmp_path: Path, reward_run: Path) -> None:
    """--resume refuses when the reward model changed: the run would continue against another objective."""
    from psipo_cli.recipe.loader import load_recipe
    from psipo_cli.run.fingerprint import differences, run_fingerprint
    from psipo_cli.training.finetune import prepare

    copy = _fake_reward_run(reward_run, tmp_path, TINY_MODEL)
    prepared = prepare(load_recipe(_write(tmp_path, copy)))
    before = run_fingerprint(prepared.recipe, prepared.train, 1)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    after = run_fingerprint(prepared.recipe, prepared.train, 1)
    assert [key for key, _ in differences(before, after)] == ["rollout.reward_model files"]
