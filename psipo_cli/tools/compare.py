"""`psipo compare`: several runs overlaid in one set of plots, and a table of their final metrics.

The runs are told apart by colour (`plots.draw_runs` with compare=True); two runs with the same directory name are
named by their parent directory too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from psipo_cli.errors import UserError
from psipo_cli.tools.panels import PANELS
from psipo_cli.tools.plots import OVERVIEW, draw_runs, make_dir, require_matplotlib
from psipo_cli.tools.run_metrics import Run, is_number, load_run

EMPTY = "—"


def compare_runs(run_dirs: list[Path], out_dir: Path, overwrite: bool = False) -> tuple[list[Path], Table]:
    """Overlay several runs in out_dir (same files as write_plots) and tabulate their final metrics."""
    runs = _load_runs(run_dirs)
    require_matplotlib()
    _check_out_dir(Path(out_dir), overwrite)
    make_dir(Path(out_dir))
    return draw_runs(runs, Path(out_dir), compare=True), final_metrics_table(runs)


def _load_runs(run_dirs: list[Path]) -> list[Run]:
    if len(run_dirs) < 2:
        raise UserError("give at least two run directories to compare", where="compare")
    seen: set[Path] = set()
    for path in run_dirs:
        if Path(path).resolve() in seen:
            raise UserError("given twice", where=str(path))
        seen.add(Path(path).resolve())
    runs = [load_run(Path(path)) for path in run_dirs]
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:  # runs/a/ipo and runs/b/ipo: name them by their parent too
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    return runs


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before drawing anything, to replace plots already in out_dir unless told to."""
    if overwrite or not out_dir.is_dir():
        return
    names = [f"{panel.stem}.png" for panel in PANELS] + [OVERVIEW]
    existing = [name for name in names if (out_dir / name).exists()]
    if existing:
        raise UserError(
            f"already holds {', '.join(existing)}; pass --overwrite to replace them or choose another --out",
            where=str(out_dir),
        )


# ---------------------------------------------------------------------------------------------------------------
# The final-metrics table

TABLE_COLUMNS = (
    ("loss", "loss"),
    ("reward", "reward"),
    ("kl_sequence", "KL/sequence"),
    ("margin", "margin h"),
    ("target", "target"),
    ("reward_accuracy", "reward acc."),
    ("logratio_chosen", "log-ratio chosen"),
    ("logratio_rejected", "log-ratio rejected"),
)
# Always shown, even where no run logged them: a preference run's columns. The others only where a run has them.
PAIR_COLUMNS = ("loss", "margin", "target", "reward_accuracy", "logratio_chosen", "logratio_rejected")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if is_number(value) else EMPTY


def _columns(runs: list[Run]) -> list[tuple[str, str]]:
    """The pair metrics when a preference or reward run is compared; a sampling run's reward and KL when one is."""
    logged = {key for run in runs for split in ("train", "eval") for key in run.last(split)}
    pairs = any(run.recipe.rollout is None for run in runs)
    return [(key, head) for key, head in TABLE_COLUMNS if key in logged or (pairs and key in PAIR_COLUMNS)]


def final_metrics_table(runs: list[Run]) -> Table:
    """Last train and last eval log of each run."""
    columns = _columns(runs)
    table = Table(title="final metrics: last train and eval logs", caption=_caption([key for key, _ in columns]))
    for header in ("run", "objective", "unit", "split", "step"):
        table.add_column(header, justify="right" if header == "step" else "left")
    for _, header in columns:
        table.add_column(header, justify="right")
    for run in runs:
        status = "" if run.finished else " (in progress)"
        for split in ("train", "eval"):
            record = run.last(split)
            if not record:
                continue
            step = str(record.get("step", EMPTY))
            cells = [_cell(record.get(key)) for key, _ in columns]
            table.add_row(run.name + status, run.objective_label, run.unit, split, step, *cells)
        table.add_section()
    return table


def _caption(keys: list[str]) -> str:
    notes = []
    if "logratio_chosen" in keys:
        notes.append("log-ratio = log π − log π_ref, the drift from the reference (a KL proxy)")
    if "kl_sequence" in keys:
        notes.append("KL/sequence: eq. 6's KL(π‖π_ref) of the sampled responses, in nats")
    return "; ".join([*notes, "unit: of h and log-ratios"])


def print_table(table: Table, console: Console) -> None:
    """Print the table; piped output gets the table's natural width, not rich's 80-column default."""
    if not console.is_terminal:
        width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        console = Console(file=console.file, width=max(width, console.width), highlight=False)
    console.print(table)
