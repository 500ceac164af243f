"""Nothing lost in one process: a loss gone NaN, a second run into a live run's directory, a write that fails
mid-checkpoint (a real file-size limit standing in for a full disk), files that are whole or absent."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from psipo_cli.errors import EXIT_DIVERGED, EXIT_WRITE_FAILED
from psipo_cli.run.checkpoints import COMPLETE_MARK, checkpoints, rotate
from psipo_cli.run.directory import read_metrics
from psipo_cli.run.lock import LOCK_FILE
from tests.conftest import (
    REPO,
    SUBPROCESS_ENV,
    TINY_DATA,
    assert_clean_error,
    finish,
    start_psipo,
    tiny_recipe,
    wait_for,
)


def _stopped(result, code: int, *fragments: str) -> str:
    """Exit `code`, one line on stderr starting 'stopped:', no traceback; the line."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == code and len(lines) == 1 and "Traceback" not in result.err, (result.code, result.err)
    assert lines[0].startswith("stopped: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- divergence ---------------------------------------------------------------------------------------------------


class _NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: a gradient that overflowed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _poison(monkeypatch: pytest.MonkeyPatch, bad: set[int], gradient: bool = False) -> None:
    """Make the loss of the `bad` training steps (1-based calls of the loss function) NaN, or only their gradients."""
    from psipo_cli.training import preference

    original, calls = preference.pair_losses, [0]

    def poisoned(*args, **kwargs):
        losses, target = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] in bad:
            losses = _NanGradient.apply(losses) if gradient else losses * float("nan")
        return losses, target

    monkeypatch.setattr(preference, "pair_losses", poisoned)


def _recipe_file(tmp_path: Path, **training: object) -> Path:
    path = tmp_path / "recipe.yaml"
    sections = {"training": {"save_steps": 1, "save_total_limit": 1, **training}}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", **sections)), encoding="utf-8")
    return path


def test_one_bad_step_is_dropped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    _poison(monkeypatch, bad={3})
    result = cli("finetune", _recipe_file(tmp_path, max_steps=3, save_total_limit=3), "--quiet")
    assert result.code == 0, result.err
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "summary.json").read_text())["bad_steps"] == 1
    assert [m["bad_steps"] for m in read_metrics(run_dir) if m["split"] == "train"] == [0, 0, 1]
    # Step 3's update was dropped: the final adapter is step 2's, and step 3 saved no checkpoint.
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-1", "checkpoint-2"]
    final, after_two = (
        load_file(run_dir / "adapter_model.safetensors"),
        load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors"),
    )
    assert final.keys() == after_two.keys() and all(torch.equal(final[k], after_two[k]) for k in final)


def test_bad_steps_in_a_row_stop_the_run_and_keep_the_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    _poison(monkeypatch, bad=set(range(3, 100)))
    recipe = _recipe_file(tmp_path, max_steps=8, max_bad_steps=2)
    line = _stopped(cli("finetune", recipe, "--quiet"), EXIT_DIVERGED, "steps 3-4", "max_bad_steps 2")
    run_dir = tmp_path / "run"
    assert str(run_dir / "checkpoint-2") in line
    # save_total_limit 1, yet the good checkpoint survived: bad steps save nothing, so rotation never pushed it out.
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-2"] and not checkpoints(run_dir, complete=False)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter_model.safetensors").exists()
    monkeypatch.undo()  # the data "fixed": the run resumes from the kept checkpoint and finishes
    resumed = cli("finetune", recipe, "--resume", "--quiet")
    assert resumed.code == 0, resumed.err
    assert [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"] == list(range(1, 9))


def test_a_nan_gradient_under_a_finite_loss_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    _poison(monkeypatch, bad={2}, gradient=True)
    result = cli("finetune", _recipe_file(tmp_path, max_steps=4, max_bad_steps=1), "--quiet")
    line = _stopped(result, EXIT_DIVERGED, "at step 2 (1 bad step(s) in a row")
    assert str(tmp_path / "run" / "checkpoint-1") in line
    logged = [m for m in read_metrics(tmp_path / "run") if m["split"] == "train"]
    assert [m["step"] for m in logged] == [1, 2] and all(m["loss"] == m["loss"] for m in logged)  # loss not NaN


# --- one run per directory ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_live_run_holds_its_directory_and_a_killed_one_does_not(tmp_path: Path, cli) -> None:
    recipe = _recipe_file(tmp_path, max_steps=100_000, save_steps=2)
    holder = start_psipo(recipe, "--quiet")
    run_dir = tmp_path / "run"
    try:
        wait_for(run_dir / "checkpoint-2" / COMPLETE_MARK, holder)
        for flags in (["--overwrite"], ["--resume"], []):
            result = cli("finetune", recipe, *flags)
            assert_clean_error(result, "output.dir", "in use by a running job", f"pid {holder.pid} on ")
        assert checkpoints(run_dir) and (run_dir / "recipe.yaml").exists()  # --overwrite deleted nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock; its details are left and named as the run replaced.
    result = cli("finetune", recipe, "training.max_steps=2", "--overwrite", "--quiet")
    assert result.code == 0, result.err
    assert f"the run that held it (pid {holder.pid} on" in result.err and "is gone; taking over" in result.err
    assert (run_dir / LOCK_FILE).read_text() == ""  # a finished run leaves its lock free


# --- torn writes --------------------------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as they would on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_is_never_resumed_from(tmp_path: Path) -> None:
    recipe = _recipe_file(tmp_path, max_steps=2, save_steps=2, save_total_limit=2)
    run_dir = tmp_path / "run"
    assert finish(start_psipo(recipe, "--quiet"))[0] == 0
    largest = max(p.stat().st_size for p in (run_dir / "checkpoint-2").iterdir())
    # Steps 3-4 under a limit that the checkpoint's largest file (the optimizer state) exceeds.
    proc = start_psipo(recipe, "training.max_steps=4", "--resume", "--quiet", preexec_fn=_file_size_limit(largest - 1))
    code, _, err = finish(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_WRITE_FAILED and len(lines) == 1 and "Traceback" not in err, err
    assert "writing checkpoint-4 failed" in lines[0] and f"{run_dir / 'checkpoint-2'}" in lines[0], lines[0]
    assert checkpoints(run_dir, complete=False) == [run_dir / "checkpoint-4"]  # torn: no completion mark
    # Room again: resume ignores the torn checkpoint, continues from checkpoint-2 and logs every step once.
    code, _, err = finish(start_psipo(recipe, "training.max_steps=4", "--resume", "--quiet"))
    assert code == 0, err
    assert [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"] == [1, 2, 3, 4]
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_a_label_file_that_cannot_be_written_is_not_left_half_written(tmp_path: Path, reward_run: Path) -> None:
    out = tmp_path / "labelled.jsonl"
    command = [sys.executable, "-m", "psipo_cli", "label", str(reward_run), str(TINY_DATA / "train.jsonl")]
    env = {**SUBPROCESS_ENV, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [*command, "--out", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(4096),
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == EXIT_WRITE_FAILED and len(lines) == 1, done.stderr
    assert f"writing {out} failed (File too large)" in lines[0] and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []  # no output, no temporary file


def _in_child(limit: int, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=SUBPROCESS_ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_file_size_limit(limit),
        check=False,
    )


def test_atomic_writes_keep_the_old_file_when_the_disk_is_full(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old", encoding="utf-8")
    code = (
        "from pathlib import Path; from psipo_cli.run.files import write_atomic; "
        f"write_atomic(Path({str(target)!r}), 'x' * 10000)"
    )
    done = _in_child(4096, code)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert target.read_text(encoding="utf-8") == "old" and sorted(tmp_path.iterdir()) == [target]


def test_an_appended_line_that_does_not_fit_is_cut_back(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n', encoding="utf-8")
    code = (
        f"from pathlib import Path; from psipo_cli.run.files import append_line; "
        f"append_line(Path({str(metrics)!r}), '{{\"step\": 2, \"pad\": \"' + 'x' * 200 + '\"}}')"
    )
    done = _in_child(100, code)  # room for part of the line only: the write comes up short
    assert done.returncode != 0 and "is the disk full?" in done.stderr, done.stderr
    assert metrics.read_text(encoding="utf-8") == '{"step": 1}\n'


def test_rotation_keeps_the_newest_complete_checkpoints_and_never_an_incomplete_one(tmp_path: Path) -> None:
    for step in range(1, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARK).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # being written
    rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    rotate(tmp_path, keep=None)
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.slow
def test_a_long_run_keeps_disk_use_bounded_and_logs_every_step_once(tmp_path: Path) -> None:
    """scripts/soak.py, scaled down (make soak runs 10,000 steps): killed after its first checkpoint, resumed,
    extended; never more than save_total_limit complete checkpoints plus the one being written."""
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "scripts" / "soak.py"), "--steps", "60", "--save-every", "10"]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["steps_logged_once"] and figures["max_checkpoint_folders_seen"] <= 3
    assert figures["complete_checkpoints_at_end"] == ["checkpoint-60", "checkpoint-65"]
