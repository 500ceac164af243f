"""Pictures of a run's metrics.jsonl: the panels of `panels` (loss, margin h against its target, reward accuracy,
drift from the reference; the reward of a sampling run's responses against their KL to the reference).

`write_plots(run_dir)` draws one run into `RUN_DIR/plots/` (one PNG per metric and `overview.png` with all of
them); `draw_runs` is the drawing itself, which `compare` uses to overlay several runs. matplotlib is the optional
extra `plots` and is imported only here, when a picture is drawn; figures are rendered with the Agg canvas (no
display, no pyplot global state), and every PNG is written to a temporary name and renamed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError
from psipo_cli.run.directory import METRICS_FILE
from psipo_cli.tools.panels import PANELS, Panel, target
from psipo_cli.tools.run_metrics import Run, load_run

PLOTS_DIR = "plots"
OVERVIEW = "overview.png"
DPI = 120
PANEL_SIZE = (7.5, 4.5)  # inches, one metric per file
CELL_SIZE = (5.0, 3.6)  # inches per panel in overview.png, small enough that its text stays legible scaled down
HEADER = 0.8  # inches above the overview's grid for the run's name and description
FONTS = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10.5}


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def require_matplotlib() -> None:
    """Fail with how to install it, before any drawing, when the optional extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'psipo[plots]'", where="plot") from None


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display, and the user's pyplot backend is left alone
    return fig


def _draw(ax: Any, panel: Panel, runs: list[Run], compare: bool) -> dict[str, Any]:
    """One panel on `ax`: a single run is coloured by curve; compared runs by run, the curve told by its style.

    Returns the panel's legend entries (label → handle). The caller puts the legend outside the axes, where it
    can never cover a curve.
    """
    from matplotlib.ticker import MaxNLocator

    for i, run in enumerate(runs):
        for s in panel.series:
            xs, values = panel.points(run, s)
            if not xs:
                continue
            style = {"marker": "o", "ms": 4.5, **s.style} if len(xs) == 1 else s.style  # a lone point shows
            color = f"C{i % 10}" if compare else s.color
            ax.plot(xs, values, color=color, label=None if compare else s.label, **style)
    panel.decorate(ax, runs, compare)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel(runs))
    if panel.x is None:  # optimizer steps: 0, 10, 20, not 0, 8, 16
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(alpha=0.3)
    if compare:
        return _style_entries(panel, runs)
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles, strict=True))


def _style_entries(panel: Panel, runs: list[Run]) -> dict[str, Any]:
    """With runs told apart by colour, grey legend entries say which line style is which curve."""
    from matplotlib.lines import Line2D

    shown = [s for s in panel.series if any(panel.points(run, s)[0] for run in runs)]
    handles = [Line2D([], [], color="0.35", label=s.label, **s.style) for s in shown]
    if panel.stem == "margin" and any(target(run) is not None for run in runs):
        handles.append(Line2D([], [], color="0.35", ls="--", lw=1.2, label="target (run's colour)"))
    if panel.stem == "reward_accuracy":
        handles.append(Line2D([], [], color="0.45", ls="--", lw=1.0, label="chance"))
    return {handle.get_label(): handle for handle in handles}


def _style_legend(fig: Any, entries: dict[str, Any]) -> None:
    if len(entries) > 1:  # one curve needs no legend
        fig.legend(entries.values(), entries.keys(), loc="outside right center", frameon=False)


def _run_legend(fig: Any, runs: list[Run]) -> None:
    """Which colour is which run, under the plots, in as many columns as fit the figure's width."""
    from matplotlib import rcParams
    from matplotlib.lines import Line2D

    labels = _run_labels(runs)
    handles = [Line2D([], [], color=f"C{i % 10}", lw=2.5, label=label) for i, label in enumerate(labels)]
    # A rough width per entry: the line handle and gaps (~1 inch) plus its text at ~0.55 em per character.
    entry = 1.0 + max(map(len, labels)) * 0.55 * rcParams["legend.fontsize"] / 72
    cols = max(1, min(len(labels), 3, int(fig.get_figwidth() // entry)))
    fig.legend(handles=handles, loc="outside lower center", ncols=cols, frameon=False)


def _run_labels(runs: list[Run]) -> list[str]:
    """Run name + objective + τ; with the log-prob aggregation where the runs' units differ."""
    if len({run.unit for run in runs}) == 1:
        return [run.label for run in runs]
    return [f"{run.label}, {run.objective.logps} log-probs ({run.unit})" for run in runs]


def _save(fig: Any, path: Path) -> Path:
    """Write the PNG under a temporary name in the same directory, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the plot: {err.strerror or err}", where=str(path)) from None
    return path


def _panel_file(panel: Panel, runs: list[Run], out_dir: Path, compare: bool) -> Path:
    fig = _figure(PANEL_SIZE)
    ax = fig.add_subplot()
    _style_legend(fig, _draw(ax, panel, runs, compare))
    # A figure title, not the axes': the layout keeps it clear of the legend beside the axes.
    if compare:
        fig.suptitle(f"{panel.title(runs)}\n{_run_names(runs)}", fontsize=13)
        _run_legend(fig, runs)
    else:
        fig.suptitle(f"{runs[0].label}: {panel.title(runs)}", fontsize=13)
    return _save(fig, out_dir / f"{panel.stem}.png")


def _grid(panels: int) -> tuple[int, int]:
    """(rows, columns) of overview.png: three to a row, but four (a reward model's) as two by two."""
    cols = 2 if panels == 4 else min(panels, 3)
    return math.ceil(panels / cols), cols


def overview_size(panels: int) -> tuple[float, float]:
    """Figure size in inches of overview.png with this many panels."""
    rows, cols = _grid(panels)
    return CELL_SIZE[0] * cols, CELL_SIZE[1] * rows + HEADER


def _overview(panels: list[Panel], runs: list[Run], out_dir: Path, compare: bool) -> Path:
    fig = _figure(overview_size(len(panels)))
    axes = list(fig.subplots(*_grid(len(panels)), squeeze=False).flat)
    entries: dict[str, Any] = {}
    for ax, panel in zip(axes, panels, strict=False):
        for label, handle in _draw(ax, panel, runs, compare).items():
            entries.setdefault(label, handle)  # "train" looks the same in every panel: list it once
        ax.set_title(panel.title(runs))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _style_legend(fig, entries)
    if compare:
        fig.suptitle(_run_names(runs), fontsize=14)
        _run_legend(fig, runs)
    else:
        fig.suptitle(_headline(runs[0]), fontsize=14)
    return _save(fig, out_dir / OVERVIEW)


def _run_names(runs: list[Run]) -> str:
    """'tiny-ipo vs tiny-dpo' while that stays short; the legend names them all in any case."""
    names = " vs ".join(run.name for run in runs)
    return names if len(names) <= 50 else f"{len(runs)} runs"


def _headline(run: Run) -> str:
    """'tiny-ipo — IPO τ=0.5, step 60 of 300 (in progress)' and the recipe's description under it."""
    max_steps = run.recipe.training.max_steps
    progress = f"step {run.last_step}" + (f" of {max_steps}" if max_steps > 0 else "")
    line = f"{run.label}, {progress}" + ("" if run.finished else " (in progress)")
    return f"{line}\n{run.recipe.description}" if run.recipe.description else line


def draw_runs(runs: list[Run], out_dir: Path, compare: bool) -> list[Path]:
    """Every panel with data as its own PNG, then overview.png, into `out_dir`; `compare` overlays the runs."""
    import matplotlib

    panels = [panel for panel in PANELS if any(panel.has_data(run) for run in runs)]
    if not panels:
        raise UserError(f"no plottable metrics in {METRICS_FILE}", where=str(runs[0].path))
    with matplotlib.rc_context(FONTS):
        paths = [_panel_file(panel, runs, out_dir, compare) for panel in panels]
        paths.append(_overview(panels, runs, out_dir, compare))
    return paths


def make_dir(path: Path) -> None:
    """`path` as a directory, created if missing; a UserError if it cannot be."""
    if path.exists() and not path.is_dir():
        raise UserError("exists and is not a directory", where=str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the directory: {err.strerror or err}", where=str(path)) from None


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def write_plots(run_dir: Path) -> list[Path]:
    """Draw a run (finished or in progress) into RUN_DIR/plots/: one PNG per metric and overview.png."""
    run = load_run(Path(run_dir))
    require_matplotlib()
    out_dir = run.path / PLOTS_DIR
    make_dir(out_dir)
    return draw_runs([run], out_dir, compare=False)
