"""`psipo plot` and `psipo compare`: PNGs of a run (finished or in progress), overlays, the final-metrics table."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from psipo_cli.recipe.loader import dump_recipe, load_recipe
from psipo_cli.tools.compare import compare_runs
from psipo_cli.tools.plots import DPI, OVERVIEW, PANEL_SIZE, PLOTS_DIR, overview_size, write_plots
from psipo_cli.tools.run_metrics import load_run
from tests.conftest import TINY_DATA, assert_clean_error, tiny_recipe, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PANELS = ("loss", "margin", "reward_accuracy", "logps_drift", "learning_rate", "throughput")
REAL_RUN = {
    "data": {"eval": str(TINY_DATA / "eval.jsonl")},
    "training": {"max_steps": 6, "logging_steps": 1, "eval_steps": 2, "per_device_eval_batch_size": 100},
}


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _recipe_file(path: Path, run_dir: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe(run_dir, **sections)), encoding="utf-8")
    return path


def _fake_run(run_dir: Path, records: list[dict[str, Any]], finished: bool = True, **sections: Any) -> Path:
    """A run directory as training leaves it: the resolved recipe.yaml, metrics.jsonl and, once finished, a summary.

    The plots read nothing else, so no model is trained.
    """
    run_dir.mkdir(parents=True)
    source = _recipe_file(run_dir.parent / f"{run_dir.name}-source.yaml", run_dir, **sections)
    (run_dir / "recipe.yaml").write_text(dump_recipe(load_recipe(source)), encoding="utf-8")
    write_jsonl(run_dir / "metrics.jsonl", records)
    if finished:
        (run_dir / "summary.json").write_text("{}\n", encoding="utf-8")
    return run_dir


def _records(steps: int, target: float | None = 1.0, final_loss: float = 0.125) -> list[dict[str, Any]]:
    """Train logs every step and eval logs every other step, with the keys PsipoTrainer logs."""
    rows = []
    for step in range(1, steps + 1):
        for split in ("train", "eval") if step % 2 == 0 else ("train",):
            row = {
                "step": step,
                "split": split,
                "loss": final_loss if step == steps else 1.0 / step,
                "margin": 0.1 * step,
                "reward_accuracy": min(1.0, 0.5 + 0.05 * step),
                "logratio_chosen": -0.01 * step,
                "logratio_rejected": -0.03 * step,
            }
            if target is not None:
                row["target"] = target
            if split == "train":
                row |= {"learning_rate": 5e-3 * (1 - step / steps), "tokens_per_s": 1000.0 + step}
            rows.append(row)
    return rows


def assert_png(path: Path, size_inches: tuple[float, float]) -> None:
    """A complete PNG that PIL decodes, of the figure size the plots module promises."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        assert image.size == (round(size_inches[0] * DPI), round(size_inches[1] * DPI)), path


def assert_plots(paths: list[Path], out_dir: Path, panels: tuple[str, ...]) -> None:
    assert paths == [out_dir / f"{name}.png" for name in panels] + [out_dir / OVERVIEW]
    for path in paths[:-1]:
        assert_png(path, PANEL_SIZE)
    assert_png(paths[-1], overview_size(len(panels)))
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


# ---------------------------------------------------------------------------------------------------------------
# Without training: run directories written by hand


def test_plot_writes_one_png_per_metric_and_an_overview(tmp_path: Path, cli) -> None:
    run_dir = _fake_run(tmp_path / "ipo-run", _records(8))
    result = cli("plot", run_dir)
    assert result.code == 0, result.err
    paths = [Path(line) for line in result.out.splitlines()]
    assert_plots(paths, run_dir / PLOTS_DIR, ALL_PANELS)


def test_reward_model_run_skips_panels_it_has_no_metrics_for(tmp_path: Path) -> None:
    records = [
        {"step": s, "split": "train", "loss": 0.7 / s, "margin": 0.2 * s, "reward_accuracy": 0.6, "learning_rate": 5e-3}
        for s in (1, 2, 3)
    ]
    run_dir = _fake_run(tmp_path / "reward", records, objective={"loss": "reward"})
    paths = write_plots(run_dir)
    assert_plots(paths, run_dir / PLOTS_DIR, ("loss", "margin", "reward_accuracy", "learning_rate"))


def test_run_being_written_with_a_half_appended_last_line_plots(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "live", _records(4), finished=False)
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"step": 5, "split": "tra')  # the trainer is mid-append
    assert_plots(write_plots(run_dir), run_dir / PLOTS_DIR, ALL_PANELS)


def test_replotting_replaces_the_previous_plots(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "run", _records(4))
    first = write_plots(run_dir)
    write_jsonl(run_dir / "metrics.jsonl", _records(12))
    assert write_plots(run_dir) == first
    assert_plots(first, run_dir / PLOTS_DIR, ALL_PANELS)


def test_not_a_run_directory_is_a_clean_error(tmp_path: Path, cli) -> None:
    assert_clean_error(cli("plot", tmp_path), str(tmp_path), "not a psipo run directory")
    assert_clean_error(cli("plot", tmp_path / "missing"), "no such run directory")
    assert not (tmp_path / PLOTS_DIR).exists()


def test_run_without_metrics_is_a_clean_error(tmp_path: Path, cli) -> None:
    run_dir = _fake_run(tmp_path / "fresh", [])
    (run_dir / "metrics.jsonl").unlink()
    assert_clean_error(cli("plot", run_dir), str(run_dir), "no metrics logged yet")
    write_jsonl(run_dir / "metrics.jsonl", [])
    assert_clean_error(cli("plot", run_dir), "no metrics logged yet")
    assert not (run_dir / PLOTS_DIR).exists()


def test_corrupt_metrics_line_is_a_clean_error(tmp_path: Path, cli) -> None:
    run_dir = _fake_run(tmp_path / "run", _records(2))
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n", encoding="utf-8")
    assert_clean_error(cli("plot", run_dir), "metrics.jsonl", "line 2 is not JSON")


def test_missing_matplotlib_says_how_to_install_it(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _fake_run(tmp_path / "run", _records(2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert_clean_error(cli("plot", run_dir), "pip install 'psipo[plots]'")


def test_compare_tabulates_final_metrics_and_overlays_runs(tmp_path: Path, cli) -> None:
    ipo = _fake_run(tmp_path / "ipo-a", _records(6, target=1.0, final_loss=0.0123))
    records = _records(4, target=None, final_loss=0.4567)
    dpo = _fake_run(tmp_path / "dpo-b", records, finished=False, objective={"loss": "dpo"})
    out = tmp_path / "cmp"
    result = cli("compare", ipo, dpo, "--out", out)
    assert result.code == 0, result.err
    train_rows = {line.split("│")[1].strip(): line for line in result.out.splitlines() if "│ train" in line}
    assert set(train_rows) == {"ipo-a", "dpo-b (in progress)"}
    for name, objective, step, loss in (
        ("ipo-a", "IPO τ=0.5", 6, "0.0123"),
        ("dpo-b (in progress)", "DPO τ=0.5", 4, "0.4567"),
    ):
        row = train_rows[name]
        assert objective in row and loss in row and re.search(rf"│\s+{step}\s+│", row), row
    assert "│ eval" in result.out
    paths = [Path(line) for line in result.out.splitlines() if line.endswith(".png")]
    assert_plots(paths, out, ALL_PANELS)


def test_compare_refuses_to_overwrite_plots_without_the_flag(tmp_path: Path, cli) -> None:
    runs = [_fake_run(tmp_path / name, _records(4)) for name in ("a", "b")]
    out = tmp_path / "cmp"
    assert cli("compare", *runs, "--out", out).code == 0
    before = (out / "loss.png").stat().st_mtime_ns
    assert_clean_error(cli("compare", *runs, "--out", out), str(out), "--overwrite", "loss.png")
    assert (out / "loss.png").stat().st_mtime_ns == before
    result = cli("compare", *runs, "--out", out, "--overwrite")
    assert result.code == 0, result.err
    assert (out / "loss.png").stat().st_mtime_ns != before


def test_compare_needs_two_distinct_runs(tmp_path: Path, cli) -> None:
    run_dir = _fake_run(tmp_path / "a", _records(2))
    assert_clean_error(cli("compare", run_dir, "--out", tmp_path / "cmp"), "at least two run directories")
    assert_clean_error(cli("compare", run_dir, run_dir, "--out", tmp_path / "cmp"), "given twice")
    assert_clean_error(cli("compare", run_dir, tmp_path, "--out", tmp_path / "cmp"), "not a psipo run directory")
    assert not (tmp_path / "cmp").exists()


def test_compare_tells_runs_with_the_same_name_apart(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path / group / "ipo", _records(2)) for group in ("x", "y")]
    _, table = compare_runs(runs, tmp_path / "cmp")
    assert list(table.columns[0].cells)[::2] == ["x/ipo", "y/ipo"]


# ---------------------------------------------------------------------------------------------------------------
# A real training run


def _train(tmp: Path, name: str, **sections: Any) -> Path:
    from psipo_cli.training.finetune import run

    recipe = load_recipe(_recipe_file(tmp / f"{name}.yaml", tmp / name, **REAL_RUN, **sections))
    run(recipe)
    return Path(recipe.output.dir)


@pytest.fixture(scope="module")
def ipo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("ipo"), "tiny-ipo")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("dpo"), "tiny-dpo", objective={"loss": "dpo"})


@pytest.mark.slow
def test_plot_of_a_trained_run(ipo_run: Path, cli) -> None:
    result = cli("plot", ipo_run)
    assert result.code == 0, result.err
    assert_plots([Path(line) for line in result.out.splitlines()], ipo_run / PLOTS_DIR, ALL_PANELS)


@pytest.mark.slow
def test_plot_of_a_run_in_progress(ipo_run: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(ipo_run, live, ignore=shutil.ignore_patterns(PLOTS_DIR))
    for leftover in ("summary.json", "adapter_model.safetensors", "adapter_config.json"):
        (live / leftover).unlink()
    assert_plots(write_plots(live), live / PLOTS_DIR, ALL_PANELS)
    assert not load_run(live).finished, "the overview's headline says '(in progress)'"
    assert load_run(ipo_run).finished


@pytest.mark.slow
def test_compare_two_trained_runs(ipo_run: Path, dpo_run: Path, tmp_path: Path, cli) -> None:
    result = cli("compare", ipo_run, dpo_run, "--out", tmp_path / "cmp")
    assert result.code == 0, result.err
    for run_dir, objective in ((ipo_run, "IPO τ=0.5"), (dpo_run, "DPO τ=0.5")):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last_eval = [r for r in records if r["split"] == "eval"][-1]
        assert last_eval["step"] == 6
        row = next(line for line in result.out.splitlines() if run_dir.name in line and "│ eval" in line)
        assert objective in row and f"{last_eval['margin']:.4f}" in row
    assert_plots([Path(p) for p in result.out.splitlines() if p.endswith(".png")], tmp_path / "cmp", ALL_PANELS)
