"""Nothing lost: a run killed with SIGKILL resumes to the same adapter and metrics as an uninterrupted one,
SIGINT saves a checkpoint and stops, torn checkpoints are never resumed from, and a doomed start fails early."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from psipo_cli.run.checkpoints import COMPLETE_MARK, checkpoints
from psipo_cli.run.directory import read_metrics
from tests.conftest import (
    TINY_DATA,
    TINY_MODEL,
    assert_clean_error,
    finish,
    rollout_sections,
    run_psipo,
    start_psipo,
    tiny_recipe,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 60, 5
SECTIONS = {
    "data": {"eval": str(TINY_DATA / "eval.jsonl")},
    "training": {
        "max_steps": STEPS,
        "save_steps": SAVE_EVERY,
        "eval_steps": 20,
        "logging_steps": 1,
        "lr_scheduler_type": "linear",  # the scheduler state matters on resume
        "per_device_eval_batch_size": 64,
    },
}
# The resumed run must find its place in the data in both batch plans: a fixed pair count, and packed rows filled by
# tokens (token_budget.py: planned batches in a new seeded order each epoch). The packed run reads the first
# PACKED_PAIRS pairs only, so its 60 steps of ~5 pairs cross two epoch boundaries after the resume.
LAYOUTS = {"pairs": {}, "packed": {"pack_tokens": 96, "per_device_train_batch_size": 3}}
PACKED_PAIRS = 100
# Per-step values compared between the resumed and the uninterrupted run (tokens_per_s is wall-clock).
COMPARED = ("loss", "margin", "reward_accuracy", "logratio_chosen", "logratio_rejected", "grad_norm", "learning_rate")


def _recipe(tmp: Path, name: str, layout: str = "pairs", **extra: dict) -> Path:
    path = tmp / f"{name}.yaml"
    sections = {**SECTIONS, "training": {**SECTIONS["training"], **LAYOUTS[layout]}, **extra}
    if layout == "packed":
        lines = (TINY_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:PACKED_PAIRS]
        (tmp / "train.jsonl").write_text("".join(lines), encoding="utf-8")
        sections["data"] = {**sections["data"], "train": str(tmp / "train.jsonl")}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / name, **sections)), encoding="utf-8")
    return path


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def straight(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The uninterrupted run, same seed, and its batch layout."""
    tmp = tmp_path_factory.mktemp("straight")
    code, _, err = finish(start_psipo(_recipe(tmp, "run", request.param)))
    assert code == 0, err
    return tmp / "run", request.param


def test_sigkill_then_resume_equals_an_uninterrupted_run(straight: tuple[Path, str], tmp_path: Path) -> None:
    straight, layout = straight
    recipe = _recipe(tmp_path, "run", layout)
    run_dir = tmp_path / "run"
    proc = start_psipo(recipe)
    wait_for(run_dir / f"checkpoint-{SAVE_EVERY}" / COMPLETE_MARK, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed: the test proves nothing"
    killed_at = max(m["step"] for m in read_metrics(run_dir))
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as metrics:
        metrics.write('{"step": 9999, "split": "tr')  # a line the kill cut short
    # A checkpoint torn by the kill: all files there but the completion mark. Resume must not trust it.
    torn = run_dir / "checkpoint-999"
    shutil.copytree(checkpoints(run_dir)[-1], torn)
    (torn / COMPLETE_MARK).unlink()

    code, _, err = finish(start_psipo(recipe, "--resume"))

    assert code == 0, err
    assert not torn.exists()
    resumed, reference = read_metrics(run_dir), read_metrics(straight)
    for split in ("train", "eval"):
        steps = [m["step"] for m in resumed if m["split"] == split]
        assert steps == [m["step"] for m in reference if m["split"] == split], (split, steps, killed_at)
        assert len(steps) == len(set(steps))  # no step logged twice, none missing
    # Same computation from restored optimizer, scheduler, RNG and data position: fp32 CPU agrees to rounding.
    for ours, theirs in zip(resumed, reference, strict=True):
        for key in COMPARED:
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (ours["step"], key)
    resumed_adapter, reference_adapter = _adapter(run_dir), _adapter(straight)
    max_diff = max((resumed_adapter[k] - reference_adapter[k]).abs().max().item() for k in reference_adapter)
    assert max_diff <= 1e-6, max_diff


RL_STEPS, RL_SAVE = 8, 3


@pytest.mark.parametrize("loss", ["rlhf", "online_psipo"])
def test_a_sampling_run_killed_and_resumed_equals_an_uninterrupted_one(
    tmp_path: Path, reward_run: Path, loss: str
) -> None:
    """The samples after resume are the ones the uninterrupted run drew: RNG, data position and optimizer restored."""
    sections = rollout_sections(reward_run, loss, iterations=2)
    sections["training"] = {**sections["training"], "max_steps": RL_STEPS, "save_steps": RL_SAVE}
    straight, killed = (_recipe(tmp_path, name, **sections, data={}) for name in ("straight", "killed"))
    assert finish(start_psipo(straight))[0] == 0
    proc = start_psipo(killed)
    wait_for(tmp_path / "killed" / f"checkpoint-{RL_SAVE}" / COMPLETE_MARK, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    code, _, err = finish(start_psipo(killed, "--resume"))
    assert code == 0, err
    resumed, reference = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight")
    assert [m["step"] for m in resumed] == [m["step"] for m in reference] == list(range(1, RL_STEPS + 1))
    for ours, theirs in zip(resumed, reference, strict=True):
        assert ours.keys() == theirs.keys()  # sampled at the same steps (rollout.iterations 2: every other one)
        for key in ("loss", "reward", "kl_sequence", "completions/mean_length", "grad_norm"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (ours["step"], key)


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "run", training={**SECTIONS["training"], "max_steps": 400, "save_steps": 1000})
    run_dir = tmp_path / "run"
    proc = start_psipo(recipe, "--plain")
    wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)

    assert code == 128 + signal.SIGINT, err
    saved = checkpoints(run_dir)
    assert len(saved) == 1 and "continue with --resume" in err and str(saved[0]) in err
    assert not (run_dir / "summary.json").exists()
    stopped_at = int(saved[0].name.split("-")[1])
    assert 0 < stopped_at < 400

    code, _, err = finish(start_psipo(recipe, "--resume", saved[0], "training.max_steps=" + str(stopped_at + 3)))
    assert code == 0, err
    train_steps = [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"]
    assert train_steps == list(range(1, stopped_at + 4))


def test_resume_errors_name_what_is_missing(cli, write_recipe, tmp_path: Path) -> None:
    recipe = write_recipe()
    assert_clean_error(cli("finetune", recipe, "--resume"), "--resume", "nothing to resume")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("{}", encoding="utf-8")
    assert_clean_error(cli("finetune", recipe, "--resume"), "--resume", "no complete checkpoint")
    torn = run_dir / "checkpoint-4"
    torn.mkdir()
    assert_clean_error(cli("finetune", recipe, "--resume", torn), "--resume", "incomplete")
    assert_clean_error(cli("finetune", recipe, "--resume", "--overwrite"), "exclusive")


def test_too_little_disk_space_fails_before_training(cli, write_recipe, tmp_path: Path, monkeypatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    result = cli("finetune", write_recipe())
    assert_clean_error(result, "output.dir", "MiB free")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_dir_fails_before_training(cli, write_recipe) -> None:
    # /proc takes no new files even from root, for whom a chmod'ed directory is still writable.
    result = cli("finetune", write_recipe(output={"dir": "/proc/psipo-run"}))
    assert_clean_error(result, "output.dir", "/proc is not writable")


# --- resuming a run whose recipe, data or model changed since the checkpoint (issue item 9) ---------------------


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run that saved checkpoint-2 and checkpoint-4; tests copy it and drop checkpoint-4, as if the job
    had died after step 2."""
    root = tmp_path_factory.mktemp("crashed")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(root / "run", training={"save_steps": 2})), encoding="utf-8")
    assert run_psipo("finetune", recipe, "--quiet") == 0
    return root / "run"


def _copy_crashed(crashed: Path, tmp: Path, **training: object) -> tuple[Path, Path]:
    """(recipe, run dir): a copy of the crashed run, its data file copied beside it, and a recipe for both."""
    run_dir, data = tmp / "run", tmp / "train.jsonl"
    shutil.copytree(crashed, run_dir)
    shutil.rmtree(run_dir / "checkpoint-4")
    (run_dir / "summary.json").unlink()
    shutil.copyfile(TINY_DATA / "train.jsonl", data)
    sections = tiny_recipe(run_dir, data={"train": str(data)}, training={"save_steps": 2, **training})
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return recipe, run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def test_resume_of_an_unchanged_run_continues(crashed: Path, tmp_path: Path, cli) -> None:
    recipe, run_dir = _copy_crashed(crashed, tmp_path)
    result = cli("finetune", recipe, "--resume", "--quiet")
    assert result.code == 0, result.err
    assert _summary(run_dir)["steps"] == 4 and "forced_resume" not in _summary(run_dir)
    assert result.err.strip() == ""  # nothing to warn about


def test_resume_refuses_a_changed_tau_and_leaves_the_run_alone(crashed: Path, tmp_path: Path, cli) -> None:
    recipe, run_dir = _copy_crashed(crashed, tmp_path)
    before = _snapshot(run_dir)
    result = cli("finetune", recipe, "objective.tau=0.1", "--resume")
    assert_clean_error(result, "--resume", "objective.tau changed (0.5 -> 0.1)", "checkpoint-2", "--force-resume")
    assert _snapshot(run_dir) == before  # recipe.yaml, metrics, checkpoints: not a byte changed


def test_resume_refuses_changed_training_data(crashed: Path, tmp_path: Path, cli) -> None:
    recipe, run_dir = _copy_crashed(crashed, tmp_path)
    data = tmp_path / "train.jsonl"
    rows = data.read_text(encoding="utf-8").splitlines()
    first = json.loads(rows[0])
    rows[0] = json.dumps({**first, "chosen": first["chosen"] + " (edited)"})
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    before = _snapshot(run_dir)
    assert_clean_error(cli("finetune", recipe, "--resume"), "--resume", "data.train", "changed", "--force-resume")
    assert _snapshot(run_dir) == before


def test_resume_allows_changed_logging_and_more_steps(crashed: Path, tmp_path: Path, cli) -> None:
    recipe, run_dir = _copy_crashed(crashed, tmp_path)
    result = cli("finetune", recipe, "training.logging_steps=2", "training.max_steps=6", "--resume", "--quiet")
    assert result.code == 0, result.err
    assert _summary(run_dir)["steps"] == 6 and "forced_resume" not in _summary(run_dir)
    assert [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"] == [1, 2, 4, 6]


def test_force_resume_continues_and_records_what_was_forced(crashed: Path, tmp_path: Path, cli) -> None:
    recipe, run_dir = _copy_crashed(crashed, tmp_path)
    original = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    result = cli("finetune", recipe, "objective.tau=0.1", "--resume", "--force-resume", "--quiet")
    assert result.code == 0, result.err
    assert _summary(run_dir)["forced_resume"] == ["objective.tau: 0.5 -> 0.1 (at step 2)"]
    # recipe.yaml is what the run finished with; the recipe of steps 1-2 is kept beside it.
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))["objective"]["tau"] == 0.1
    assert (run_dir / "recipe.until-step-2.yaml").read_text(encoding="utf-8") == original
    # checkpoint-4, written after the forced resume, is of the changed run: extending it needs no force, and the
    # summary still reports the change, which is part of the run's history.
    again = cli("finetune", recipe, "objective.tau=0.1", "training.max_steps=6", "--resume", "--quiet")
    assert again.code == 0, again.err
    assert _summary(run_dir)["steps"] == 6
    assert _summary(run_dir)["forced_resume"] == ["objective.tau: 0.5 -> 0.1 (at step 2)"]


def test_checkpoints_without_fingerprints_resume_with_a_warning(crashed: Path, tmp_path: Path, cli) -> None:
    recipe, run_dir = _copy_crashed(crashed, tmp_path)
    (run_dir / "checkpoint-2" / COMPLETE_MARK).write_text('{"step": 2}\n', encoding="utf-8")  # older psipo's mark
    result = cli("finetune", recipe, "--resume", "--quiet")
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --resume:") and "checkpoint-2" in warnings[0]


def test_force_resume_needs_resume(write_recipe, cli) -> None:
    assert_clean_error(cli("finetune", write_recipe(), "--force-resume"), "--force-resume", "--resume")


def test_a_local_model_retrained_in_place_changes_its_identity(tmp_path: Path) -> None:
    from psipo_cli.run.fingerprint import model_identity

    model = shutil.copytree(TINY_MODEL, tmp_path / "model")
    before = model_identity(str(model), None)
    assert model_identity(str(model), None) == before
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_identity(str(model), None) != before
    assert model_identity("org/model", None) != model_identity("org/model", "v2")
