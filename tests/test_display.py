"""What a run prints: banner, one line per log step in plain mode (no carriage returns), a live bar on a
terminal, nothing but the run dir when quiet; and report_to really reaches the HF integrations."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from psipo_cli.run import display as report
from psipo_cli.run.display import Display
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.slow

EVAL = {"data": {"eval": str(TINY_DATA / "eval.jsonl")}, "training": {"max_steps": 4, "logging_steps": 1}}


def test_plain_mode_prints_banner_one_line_per_step_and_summary(cli, write_recipe, tmp_path: Path) -> None:
    result = cli("finetune", write_recipe(**EVAL), "training.eval_steps=2")  # captured stdout is not a terminal

    assert result.code == 0, result.err
    assert "\r" not in result.out
    lines = result.out.splitlines()
    assert any(line.startswith("objective  ipo τ=0.5") for line in lines)  # target 1/(2τ) = 1
    assert any(line.startswith("data       ") and line.endswith(" 200 eval pairs") for line in lines)
    steps = [line for line in lines if line.startswith("train step")]
    assert [line.split()[2] for line in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" loss " in line and " h " in line and "→1 " in line and "tok/s" in line for line in steps)
    assert "eta" in steps[0]
    assert [line.split()[2] for line in lines if line.startswith("eval  step")] == ["2/4", "4/4"]
    assert "psipo run finished: 4 steps" in result.out
    assert lines[-1] == f"run saved in {tmp_path / 'run'}"


def test_quiet_prints_only_where_the_run_is(cli, write_recipe, tmp_path: Path) -> None:
    result = cli("finetune", write_recipe(), "--quiet")

    assert result.code == 0, result.err
    assert result.out.strip() == f"run saved in {tmp_path / 'run'}"


def test_rich_mode_draws_a_live_bar_on_a_terminal(cli, write_recipe, monkeypatch) -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=160, highlight=False, soft_wrap=True)
    monkeypatch.setattr(report, "console", terminal)
    result = cli("finetune", write_recipe())

    assert result.code == 0, result.err
    shown = screen.getvalue()
    assert "\r" in shown or "\x1b[" in shown  # redrawn in place, not printed line by line
    assert "4/4" in shown and "tok/s" in shown and "loss" in shown
    assert not any(line.startswith("train step") for line in shown.splitlines())


def test_display_mode_follows_flags_and_terminal(monkeypatch) -> None:
    monkeypatch.setattr(report, "console", Console(file=io.StringIO(), force_terminal=True))
    assert report.pick_mode(quiet=False, plain=False) == "rich"
    assert report.pick_mode(quiet=False, plain=True) == "plain"
    assert report.pick_mode(quiet=True, plain=False) == "quiet"
    monkeypatch.setattr(report, "console", Console(file=io.StringIO(), force_terminal=False))
    assert report.pick_mode(quiet=False, plain=False) == "plain"
    assert isinstance(Display("plain").callback(), report.PlainProgress)


def test_report_to_tensorboard_writes_event_files_offline(cli, write_recipe, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cli("finetune", write_recipe(output={"dir": str(tmp_path / "run"), "report_to": ["tensorboard"]}))

    assert result.code == 0, result.err
    events = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/margin", "train/reward_accuracy"} <= set(tags)
    assert len(accumulator.Scalars("train/loss")) == 4
