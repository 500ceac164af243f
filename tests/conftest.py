"""Shared fixtures: the repo's tiny model and data, a recipe factory, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

# No test may reach a hub: everything is local, shipped or generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "assets" / "tiny-llama"
TINY_DATA = REPO / "data" / "tiny-prefs"
RECIPES = REPO / "recipes"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `psipo ARGS...` in-process through the real entry point (error handler included)."""
    from psipo_cli.cli import main

    def run(*args: str) -> CliResult:
        import sys

        argv, sys.argv = sys.argv, ["psipo", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            sys.argv = argv
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_psipo(*args: str | Path) -> int:
    """`psipo ARGS...` in-process through the real entry point, for module-scoped fixtures (`cli` is per test)."""
    import sys

    from psipo_cli.cli import main

    argv, sys.argv = sys.argv, ["psipo", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start_psipo(*args: str | Path, command: str = "finetune", **popen: Any) -> subprocess.Popen:
    """`psipo COMMAND ARGS...` in a process of its own (to be killed, or to hold a run), output piped."""
    argv = [sys.executable, "-m", "psipo_cli", command, *map(str, args)]
    options = {"env": SUBPROCESS_ENV, "cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(argv, text=True, **options)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` exists; fails if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def tiny_recipe(output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The demo recipe as a dict, with absolute paths, a tmp output dir and the given sections merged in."""
    from psipo_cli.recipe.loader import deep_merge

    base = {
        "model": {"name_or_path": str(TINY_MODEL), "dtype": "float32"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(TINY_DATA / "train.jsonl"), "max_length": 64},
        "objective": {"loss": "ipo", "tau": 0.5},
        "training": {
            "learning_rate": 5e-3,
            "max_steps": 4,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "save_steps": 1000,
            "lr_scheduler_type": "constant",
            "seed": 0,
        },
        "output": {"dir": str(output_dir)},
    }
    return deep_merge(base, sections)


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny recipe (sections merged over the demo's) to tmp and return its path."""

    def write(name: str = "recipe.yaml", **sections: dict[str, Any]) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", **sections)), encoding="utf-8")
        return path

    return write


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_clean_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.code == 2, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny reward-model run (a few steps: the sampling stages need its scores, not its accuracy)."""
    tmp = tmp_path_factory.mktemp("reward-run")
    sections = {"objective": {"loss": "reward"}, "training": {"max_steps": 20, "per_device_train_batch_size": 16}}
    path = tmp / "reward.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / "reward", **sections)), encoding="utf-8")
    assert run_psipo("finetune", path) == 0
    return tmp / "reward"


def rollout_sections(reward_dir: Path, loss: str = "rlhf", **rollout: Any) -> dict[str, Any]:
    """Recipe sections of a short sampling run (rlhf or online_psipo) against `reward_dir`."""
    return {
        "objective": {"loss": loss, "tau": 0.1},
        "rollout": {"reward_model": str(reward_dir), "max_new_tokens": 8, **rollout},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
    }
