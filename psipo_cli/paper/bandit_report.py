"""`psipo bandit`: run the paper's tabular examples for several (loss, τ) and report them as a table, JSON or plot.

Training and closed forms come from `bandit` and `bandit_online` (which take their losses from `objectives`); this
module only validates the command's flags, calls `train_bandit` or `train_online` once per loss (vectorised over τ
and seeds), and formats. An `online-` loss reads --pairs as a preference matrix and samples its pairs from the
policy (Calandriello et al. 2024); its closed form is the online fixed point, the Nash equilibrium for β = 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from torch import Tensor

from psipo_cli import objectives
from psipo_cli.errors import UserError
from psipo_cli.paper.bandit import Pair, closed_form, parse_actions, parse_pairs, summarize, train_bandit
from psipo_cli.paper.bandit_online import ONLINE_OBJECTIVES, online_fixed_point, parse_preferences, train_online

CURVE_POINTS = 180  # recorded steps per curve: every 100th step at the paper's 18,000
# IPO is ΨPO with identity Ψ and DPO's Ψ is implicitly the logit: `--psi` only changes ΨPO rows.
FIXED_PSI = {"ipo": "identity", "dpo": "logit"}
ONLINE = "online-"  # prefix of a loss trained on pairs drawn from the policy: online-ipo, online-psipo
LOSSES = (*objectives.OBJECTIVES, *(ONLINE + name for name in ONLINE_OBJECTIVES))
ONLINE_CAPTION = "; online: its fixed point π ∝ π_ref·exp(P(·≻π_β)/τ) (identity Ψ), the Nash equilibrium for β = 0."


@dataclass
class BanditResult:
    """One (loss, τ): seed mean and 95% interval of π, per action (A,) at the end and (K, A) over steps."""

    loss: str
    tau: float
    psi: str  # the Ψ this loss actually optimises
    mean: Tensor  # (A,)
    low: Tensor  # (A,)
    high: Tensor  # (A,)
    closed: Tensor | None  # (A,) optimum of the expected loss; None where it is infinite
    curve_mean: Tensor  # (K, A)
    curve_low: Tensor  # (K, A)
    curve_high: Tensor  # (K, A)
    mixture: float = 0.0  # β of an online loss's sampling policy π^(1−β)·π_ref^β

    @property
    def gap(self) -> float | None:
        """Largest |mean π − closed-form π| over actions."""
        return None if self.closed is None else float((self.mean.double() - self.closed).abs().max())

    @property
    def name(self) -> str:
        objective = self.loss.removeprefix(ONLINE)
        if objective == self.loss:
            return f"ΨPO ({self.psi})" if objective == "psipo" else objective.upper()
        if not self.mixture:
            return f"online ΨPO ({self.psi})" if objective == "psipo" else "online IPO"
        return f"ΨPO-MD ({self.psi}, β={self.mixture:g})" if objective == "psipo" else f"IPO-MD (β={self.mixture:g})"

    @property
    def title(self) -> str:
        return f"{self.name}, τ={self.tau:g}"


@dataclass
class BanditReport:
    actions: list[str]
    pairs: list[Pair]
    preference: Tensor | None  # (A, A) P(i ≻ j) read from the pairs, when an online loss ran
    settings: dict[str, Any]
    curve_steps: list[int]
    results: list[BanditResult]
    seconds: float  # wall time of the training and closed forms


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _check_flags(losses: list[str], taus: list[float], psi: str, mixture: float) -> None:
    """What `train_bandit` would only find after training the earlier losses, or report less precisely."""
    for loss in losses:
        if loss not in LOSSES:
            raise UserError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}", where="loss")
    if not 0 <= mixture <= 1:
        raise UserError(f"must be in [0, 1], got {mixture:g}", where="mixture")
    if mixture and not any(loss.startswith(ONLINE) for loss in losses):
        raise UserError("only online losses sample from a mixture: add --loss online-ipo", where="mixture")
    if psi not in objectives.PSI:
        raise UserError(f"unknown psi {psi!r}; valid: {', '.join(objectives.PSI)}", where="psi")
    for tau in taus:
        if not 0 < tau < math.inf:
            raise UserError(f"must be positive and finite, got {tau:g}", where="tau")


def check_plot_path(path: Path) -> None:
    """Fail before training, not after, if the plot cannot be written where asked."""
    if path.suffix.lower() != ".png":
        raise UserError("the plot is written as PNG: give a file name ending in .png", where=f"plot {path}")
    if not path.parent.is_dir():
        raise UserError(f"directory {str(path.parent)!r} does not exist", where=f"plot {path}")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("needs matplotlib: pip install 'psipo[plots]'", where="plot")


def run_bandit(
    actions: str,
    pairs: str,
    losses: list[str],
    taus: list[float],
    psi: str,
    steps: int,
    lr: float,
    batch: int,
    seeds: int,
    seed: int,
    mixture: float = 0.0,
) -> BanditReport:
    """Parse the specs, train every (loss, τ, seed) from π_ref, and pair each result with its closed form.

    Offline losses train on the listed pairs as a dataset; `online-` losses read them as a preference matrix
    (each pair once, see `parse_preferences`) and draw their pairs from π_β ∝ π^(1−β)·π_ref^β, β = `mixture`.
    """
    names = parse_actions(actions)
    parsed = parse_pairs(pairs, names)
    losses, taus = _unique(list(losses)), _unique([float(tau) for tau in taus])
    _check_flags(losses, taus, psi, mixture)
    online = any(loss.startswith(ONLINE) for loss in losses)
    preference = parse_preferences(pairs, names) if online else None
    optimiser = dict(steps=steps, lr=lr, batch=batch, seeds=seeds, seed=seed)
    record_every = max(1, steps // CURVE_POINTS)
    start = time.perf_counter()
    results, curve_steps = [], []
    for loss in losses:
        objective = loss.removeprefix(ONLINE)
        loss_psi = FIXED_PSI.get(objective, psi)
        if preference is not None and objective != loss:
            # closed forms first: one that cannot be computed (τ far too small) fails before any training
            closed = [online_fixed_point(preference, tau, psi=loss_psi, mixture=mixture) for tau in taus]
            run = train_online(
                preference, objective, taus, psi=psi, mixture=mixture, record_every=record_every, **optimiser
            )
        else:
            run = train_bandit(len(names), parsed, loss, taus, psi=psi, record_every=record_every, **optimiser)
            closed = [closed_form(len(names), parsed, loss, tau, psi=psi) for tau in taus]
        summary, curve_steps = summarize(run), run.curve_steps
        for i, tau in enumerate(taus):
            results.append(
                BanditResult(
                    loss,
                    tau,
                    loss_psi,
                    summary.mean[i],
                    summary.low[i],
                    summary.high[i],
                    closed[i],
                    summary.curve_mean[:, i],
                    summary.curve_low[:, i],
                    summary.curve_high[:, i],
                    mixture if objective != loss else 0.0,
                )
            )
    seconds = time.perf_counter() - start
    settings = dict(losses=losses, taus=taus, psi=psi, mixture=mixture, **optimiser)
    return BanditReport(names, parsed, preference, settings, curve_steps, results, seconds)


def _by_action(actions: list[str], values: Tensor) -> dict[str, float]:
    return {name: float(value) for name, value in zip(actions, values.tolist(), strict=True)}


def to_json(report: BanditReport) -> str:
    """The whole report as one JSON document (the only thing `--json` prints)."""
    names = report.actions
    results = [
        {
            "loss": r.loss,
            "tau": r.tau,
            "psi": r.psi,
            "probs": _by_action(names, r.mean),
            "interval": {name: [lo, hi] for name, lo, hi in zip(names, r.low.tolist(), r.high.tolist(), strict=True)},
            "closed_form": None if r.closed is None else _by_action(names, r.closed),
            "gap": r.gap,
        }
        for r in report.results
    ]
    pairs = [{"winner": names[p.winner], "loser": names[p.loser], "p_hat": p.p_hat} for p in report.pairs]
    settings = {"actions": names, "pairs": pairs, **report.settings, "interval": "95%, normal approx., seed mean"}
    if report.preference is not None:  # P(row ≻ column), unlisted pairs ½
        rows = zip(names, report.preference, strict=True)
        settings["preference"] = {name: _by_action(names, row) for name, row in rows}
    return json.dumps({"results": results, "settings": settings}, indent=2)


def _table(report: BanditReport) -> Table:
    s = report.settings
    online = report.preference is not None
    seeds = f"{s['seeds']} seed{'s' if s['seeds'] > 1 else ''} (from seed {s['seed']})"
    table = Table(
        title=f"psipo bandit: {s['steps']} steps, lr {s['lr']:g}, batch {s['batch']}, {seeds}, {report.seconds:.1f} s",
        caption="π: seed mean [95% interval of that mean]. closed form: optimum of the expected loss, "
        "— where infinite (DPO, hard labels)" + (ONLINE_CAPTION if online else "."),
    )
    table.add_column("objective")
    table.add_column("τ", justify="right")
    for name in report.actions:
        table.add_column(f"π({name})", justify="right")
    table.add_column(f"closed form ({', '.join(report.actions)})", justify="right")
    table.add_column("max |gap|", justify="right")
    for r in report.results:
        probs = [
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
            for m, lo, hi in zip(r.mean.tolist(), r.low.tolist(), r.high.tolist(), strict=True)
        ]
        closed = "—" if r.closed is None else "  ".join(f"{p:.3f}" for p in r.closed.tolist())
        gap = "—" if r.gap is None else f"{r.gap:.4f}"
        table.add_row(r.name, f"{r.tau:g}", *probs, closed, gap)
    return table


def print_table(report: BanditReport, console: Console) -> None:
    """Print the table; piped output gets the table's natural width, not rich's 80-column default."""
    table = _table(report)
    if not console.is_terminal:
        width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        console = Console(file=console.file, width=max(width, console.width), highlight=False)
    console.print(table)


def save_plot(report: BanditReport, path: Path) -> None:
    """Learning curves like the paper's Figures 1–2: one panel per (loss, τ), π of every action over steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    losses, taus = report.settings["losses"], report.settings["taus"]
    fig, axes = plt.subplots(
        len(losses),
        len(taus),
        figsize=(3.6 * len(taus) + 1.4, 2.9 * len(losses)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    colors = [f"C{i % 10}" for i in range(len(report.actions))]
    for ax, r in zip(axes.flat, report.results, strict=True):  # results are ordered loss-major, like the grid's rows
        for a, color in enumerate(colors):
            ax.plot(report.curve_steps, r.curve_mean[:, a], color=color, lw=1.6)
            ax.fill_between(report.curve_steps, r.curve_low[:, a], r.curve_high[:, a], color=color, alpha=0.25, lw=0)
            if r.closed is not None:
                ax.axhline(float(r.closed[a]), color="black", ls=(0, (4, 3)), lw=0.9, zorder=3)  # on top
        ax.set(title=r.title, xlabel="step", ylim=(-0.03, 1.03), xlim=(0, report.curve_steps[-1]))
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("π(action)")
    handles = [Line2D([], [], color=c, lw=1.6, label=n) for n, c in zip(report.actions, colors, strict=True)]
    handles.append(Line2D([], [], color="black", ls=(0, (4, 3)), lw=0.9, label="closed form"))
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    fig.get_layout_engine().set(w_pad=0.08, h_pad=0.08)
    fig.savefig(path, dpi=120)
    plt.close(fig)
