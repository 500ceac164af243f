"""Nothing lost on a cluster, with real processes on CPU (gloo): a rank killed under DeepSpeed, resume on another
number of processes, and an output directory that not every process shares."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from psipo_cli.recipe.loader import deep_merge
from psipo_cli.run.checkpoints import COMPLETE_MARK
from psipo_cli.run.directory import read_metrics
from psipo_cli.run.lock import LOCK_FILE
from psipo_cli.training.distributed import free_port
from tests.conftest import (
    SUBPROCESS_ENV,
    assert_clean_error,
    finish,
    rollout_sections,
    start_psipo,
    tiny_recipe,
    wait_for,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE = 6, 2
COMPARED = ("loss", "grad_norm", "learning_rate", "reward", "kl_sequence")


def _write(tmp: Path, name: str, **sections: Any) -> Path:
    path = tmp / f"{name}.yaml"
    base = {"training": {"max_steps": STEPS, "save_steps": SAVE, "logging_steps": 1, "per_device_train_batch_size": 4}}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / name, **deep_merge(base, sections))), encoding="utf-8")
    return path


def _launch(recipe: Path, *args: str, processes: int = 2) -> Any:
    return start_psipo(recipe, "-n", str(processes), *args, command="launch")


def _train_logs(run_dir: Path) -> list[dict[str, Any]]:
    return [m for m in read_metrics(run_dir) if m["split"] == "train"]


def _same_losses(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], tolerance: float) -> None:
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    for mine, other in zip(ours, theirs, strict=True):
        for key in COMPARED:
            if key in other:
                assert mine[key] == pytest.approx(other[key], rel=tolerance, abs=tolerance), (mine["step"], key)


def _pid_of_rank(run_dir: Path, rank: int) -> int:
    """The pid the run's lock records for `rank` (every process registers there at start)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            holder = json.loads((run_dir / LOCK_FILE).read_text())
        except (OSError, ValueError):  # not written yet
            holder = {}
        for process in holder.get("processes", []):
            if process["rank"] == rank:
                return process["pid"]
        time.sleep(0.05)
    raise AssertionError("the run never recorded its processes")


KILL_CASES = {
    "zero2": {"distributed": {"strategy": "zero2"}},
    "zero3-precomputed-reference": {
        "distributed": {"strategy": "zero3"},
        "objective": {"precompute_ref_log_probs": True},
    },
    "rlhf-zero2": {"distributed": {"strategy": "zero2"}},
}


@pytest.mark.parametrize("case", list(KILL_CASES))
def test_a_rank_killed_under_deepspeed_resumes_to_the_uninterrupted_losses(
    case: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sections = dict(KILL_CASES[case])
    if case.startswith("rlhf"):
        rollout = rollout_sections(request.getfixturevalue("reward_run"), "rlhf", iterations=2)
        sections = deep_merge(sections, {k: v for k, v in rollout.items() if k != "training"})
    straight, killed = _write(tmp_path, "straight", **sections), _write(tmp_path, "killed", **sections)
    code, out, err = finish(_launch(straight), timeout=600)
    assert code == 0, out[-2000:] + err[-3000:]

    run_dir = tmp_path / "killed"
    proc = _launch(killed)
    wait_for(run_dir / f"checkpoint-{SAVE}" / COMPLETE_MARK, proc, timeout=300)
    victim = _pid_of_rank(run_dir, 1)
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(proc)
    assert code != 0 and not (run_dir / "summary.json").exists()
    # The surviving rank says which rank died and how to go on, in one line of its own.
    said = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(said) == 1, err[-4000:]
    assert f"rank 1 (pid {victim}) died near step" in said[0] and "--resume and 2 processes" in said[0], said[0]

    code, out, err = finish(_launch(killed, "--resume"), timeout=600)
    assert code == 0, out[-2000:] + err[-3000:]
    # Same data position, optimizer shards, scheduler and RNG: the losses of the run that was never killed.
    _same_losses(_train_logs(run_dir), _train_logs(tmp_path / "straight"), 1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps of 8 pairs in one process: what a run moved between process counts must log."""
    tmp = tmp_path_factory.mktemp("single")
    recipe = _write(tmp, "single", training={"max_steps": 4, "per_device_train_batch_size": 8})
    code, _, err = finish(start_psipo(recipe, "--quiet"))
    assert code == 0, err
    return tmp / "single"


def test_a_plain_run_resumes_on_another_number_of_processes(tmp_path: Path, single: Path, cli) -> None:
    """2 → 1 and 1 → 2 processes with the same pairs per step: the losses of a run that never moved. A different
    number of pairs per step is another run, refused like any other change."""
    two_then_one = _write(tmp_path, "two-then-one", training={"max_steps": 2})
    code, out, err = finish(_launch(two_then_one), timeout=600)
    assert code == 0, out[-2000:] + err[-3000:]
    batch_of_4 = cli("finetune", two_then_one, "--resume", "training.max_steps=4")
    assert_clean_error(batch_of_4, "--resume", "pairs per step changed (8 -> 4)")
    resumed = cli(
        "finetune", two_then_one, "--resume", "training.max_steps=4", "training.per_device_train_batch_size=8"
    )
    assert resumed.code == 0, resumed.err

    one_then_two = _write(tmp_path, "one-then-two", training={"max_steps": 2, "per_device_train_batch_size": 8})
    assert cli("finetune", one_then_two, "--quiet").code == 0
    moved = _launch(one_then_two, "--resume", "training.max_steps=4", "training.per_device_train_batch_size=4")
    code, out, err = finish(moved, timeout=600)
    assert code == 0, out[-2000:] + err[-3000:]
    for name in ("two-then-one", "one-then-two"):  # summation order differs between 1 and 2 processes
        _same_losses(_train_logs(tmp_path / name), _train_logs(single), 1e-4)


def test_zero_shards_resume_only_on_their_own_number_of_processes(tmp_path: Path, cli) -> None:
    """DeepSpeed cannot re-split ZeRO optimizer shards for another number of processes, nor does a plain optimizer
    find them: both resumes are refused with one line before anything is loaded."""
    recipe = _write(tmp_path, "run", distributed={"strategy": "zero2"}, training={"max_steps": 2})
    code, out, err = finish(_launch(recipe), timeout=600)
    assert code == 0, out[-2000:] + err[-3000:]
    one = ("--resume", "training.max_steps=4", "training.per_device_train_batch_size=8")
    refused = cli("finetune", recipe, *one)
    assert_clean_error(refused, "--resume", "shards for 2 processes", "cannot re-split for 1", "with 2 processes")
    plain = cli("finetune", recipe, *one, "distributed.strategy=ddp")
    assert_clean_error(plain, "--resume", "DeepSpeed ZeRO, and this run is without DeepSpeed")


def test_deepspeed_runs_in_a_process_no_launcher_started(tmp_path: Path) -> None:
    """`psipo finetune` (or `psipo launch -n 1`) with ZeRO: psipo provides the rendezvous a launcher would."""
    recipe = _write(tmp_path, "run", distributed={"strategy": "zero2"}, training={"max_steps": 2})
    code, _, err = finish(start_psipo(recipe, "--quiet"))
    assert code == 0, err[-3000:]
    assert [m["step"] for m in _train_logs(tmp_path / "run")] == [1, 2]


def test_an_output_dir_not_shared_by_every_process_is_refused_at_start(tmp_path: Path) -> None:
    """Two processes of one job, each seeing its own output.dir (as two nodes without a shared filesystem would):
    stopped before training with one line, nothing left behind."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        recipe = _write(node, "run")
        env = {
            **SUBPROCESS_ENV,
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
        }
        procs.append(start_psipo(recipe, "--quiet", env=env))
    results = [finish(proc, timeout=300) for proc in procs]
    assert [code for code, _, _ in results] == [2, 2], [err[-2000:] for _, _, err in results]
    lines = [line for _, _, err in results for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "is not shared by all processes" in lines[0], lines
    assert not (tmp_path / "node0" / "run").exists() and not (tmp_path / "node1" / "run").exists()  # run dirs
