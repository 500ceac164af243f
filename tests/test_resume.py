"""Nothing lost: a run killed with SIGKILL resumes to the same adapter and metrics as an uninterrupted one,
SIGINT saves a checkpoint and stops, torn checkpoints are never resumed from, and a doomed start fails early."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from psipo_cli.checkpoints import COMPLETE_MARK, checkpoints
from psipo_cli.rundir import read_metrics
from tests.conftest import REPO, TINY_DATA, assert_clean_error, tiny_recipe

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
# Per-step values compared between the resumed and the uninterrupted run (tokens_per_s is wall-clock).
COMPARED = ("loss", "margin", "reward_accuracy", "logratio_chosen", "logratio_rejected", "grad_norm", "learning_rate")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _recipe(tmp: Path, name: str, **extra: dict) -> Path:
    path = tmp / f"{name}.yaml"
    sections = {**SECTIONS, **extra}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / name, **sections)), encoding="utf-8")
    return path


def _psipo(*args: str | Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "psipo_cli", "finetune", *map(str, args)]
    return subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, same seed."""
    tmp = tmp_path_factory.mktemp("straight")
    code, _, err = _finish(_psipo(_recipe(tmp, "run")))
    assert code == 0, err
    return tmp / "run"


def test_sigkill_then_resume_equals_an_uninterrupted_run(straight: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "run")
    run_dir = tmp_path / "run"
    proc = _psipo(recipe)
    _wait_for(run_dir / f"checkpoint-{SAVE_EVERY}" / COMPLETE_MARK, proc)
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

    code, _, err = _finish(_psipo(recipe, "--resume"))

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


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "run", training={**SECTIONS["training"], "max_steps": 400, "save_steps": 1000})
    run_dir = tmp_path / "run"
    proc = _psipo(recipe, "--plain")
    _wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = _finish(proc)

    assert code == 128 + signal.SIGINT, err
    saved = checkpoints(run_dir)
    assert len(saved) == 1 and "continue with --resume" in err and str(saved[0]) in err
    assert not (run_dir / "summary.json").exists()
    stopped_at = int(saved[0].name.split("-")[1])
    assert 0 < stopped_at < 400

    code, _, err = _finish(_psipo(recipe, "--resume", saved[0], "training.max_steps=" + str(stopped_at + 3)))
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
