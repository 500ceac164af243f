"""IPO vs DPO on the tiny transformer: the mean margin h over training against IPO's target 1/(2τ) (`make paper`).

The transformer counterpart of the paper's bandit examples (Azar et al. 2023, arXiv 2310.12036v2, §5.3–5.4).
With deterministic preferences IPO regresses every margin onto 1/(2τ) (eq. 28), so its mean margin settles
there; DPO's logistic loss (eq. 9) keeps pushing margins up whatever τ is. Every run is psipo's own
`load_recipe` (recipes/tiny-ipo.yaml plus overrides) and `finetune.run`; nothing here trains.

The first `--pairs` rows of data/tiny-prefs/train.jsonl are both the training and the evaluation set, so the
curves are the margin on the pairs being fitted, which is where the two optima differ. Both losses use
token-mean log-probs (`objective.logps=mean`), so h is in nats per response token, IPO's target's units.

Writes OUT/paper-margins.png (one panel per τ) and OUT/paper-margins.md (the table and the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.run.directory import read_metrics
from psipo_cli.training.finetune import run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-ipo.yaml"
TRAIN = REPO / "data" / "tiny-prefs" / "train.jsonl"
LOSSES = ("ipo", "dpo")
BATCH = 16  # pairs per step, as in recipes/tiny-ipo.yaml
STYLE = {
    "ipo": {"color": "C0", "ls": "-", "lw": 1.8, "label": "IPO"},
    "dpo": {"color": "C1", "ls": "--", "lw": 1.8, "label": "DPO"},
}
# zorder 3: drawn over the IPO curve that settles on it, so the target stays visible
TARGET_STYLE = {"color": "black", "ls": ":", "lw": 1.4, "zorder": 3, "label": "IPO target 1/(2τ)"}


@dataclass
class Curve:
    """Evaluation of one (loss, τ) run on its training pairs."""

    loss: str
    tau: float
    steps: list[int]
    margins: list[float]  # mean h over the pairs, nats per response token
    accuracy: float  # final share of pairs with h > 0
    seconds: float  # wall time of the run, loading included

    @property
    def margin(self) -> float:
        return self.margins[-1]


def target(tau: float) -> float:
    """IPO's margin 1/(2τ) (eq. 28)."""
    return 1 / (2 * tau)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, default=REPO / "docs", help="folder for the PNG and the table (default: docs/)")
    add(
        "--taus",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="regularisation strengths τ (default: %(default)s)",
    )
    add("--steps", type=int, default=200, help="optimizer steps per run (default: %(default)s)")
    add("--pairs", type=int, default=64, help="first N training pairs, trained and evaluated on (default: %(default)s)")
    add("--lr", type=float, default=2.5e-3, help="constant learning rate (default: %(default)s)")
    add("--eval-every", type=int, default=10, help="evaluate on the pairs every this many steps (default: %(default)s)")
    add("--work", type=Path, default=None, help="folder for the run directories (default: a temporary one)")
    args = parser.parse_args(argv)
    if min(args.steps, args.pairs, args.eval_every) < 1 or min(args.taus) <= 0:
        parser.error("--steps, --pairs and --eval-every must be at least 1 and every τ positive")
    return args


def write_subset(pairs: int, folder: Path) -> Path:
    """The first `pairs` rows of the shipped training file, as their own .jsonl."""
    lines = TRAIN.read_text(encoding="utf-8").splitlines()[:pairs]
    path = folder / f"train{len(lines)}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def overrides(loss: str, tau: float, args: argparse.Namespace, subset: Path, run_dir: Path) -> list[str]:
    return [
        f"objective.loss={loss}",
        f"objective.tau={tau}",
        "objective.logps=mean",  # DPO defaults to sum: mean puts both margins in the target's units
        f"data.train={subset}",
        f"data.eval={subset}",
        f"training.max_steps={args.steps}",
        f"training.learning_rate={args.lr}",
        # Constant, not the recipe's linear decay: a learning rate decayed to 0 would flatten DPO's curve too.
        "training.lr_scheduler_type=constant",
        f"training.per_device_train_batch_size={BATCH}",
        f"training.logging_steps={args.eval_every}",
        f"training.eval_steps={args.eval_every}",
        f"training.save_steps={args.steps}",  # one checkpoint, at the end
        f"output.dir={run_dir}",
    ]


def train(loss: str, tau: float, args: argparse.Namespace, subset: Path, work: Path) -> Curve:
    """One run through psipo; the trainer's per-step printout goes to WORK/<loss>-tau<τ>.log."""
    run_dir = work / f"{loss}-tau{tau:g}"
    recipe = load_recipe(RECIPE, overrides(loss, tau, args, subset, run_dir))
    started = time.perf_counter()
    log = work / f"{run_dir.name}.log"
    with log.open("w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
        run(recipe, overwrite=True)
    evals = [m for m in read_metrics(run_dir) if m["split"] == "eval"]
    # π starts at π_ref (LoRA's B is zero at initialisation), so h = 0 at step 0.
    steps, margins = [0] + [m["step"] for m in evals], [0.0] + [m["margin"] for m in evals]
    return Curve(loss, tau, steps, margins, evals[-1]["reward_accuracy"], time.perf_counter() - started)


def train_all(args: argparse.Namespace, work: Path) -> list[Curve]:
    subset = write_subset(args.pairs, work)
    curves = []
    for tau in args.taus:
        for loss in LOSSES:
            curve = train(loss, tau, args, subset, work)
            print(
                f"{loss.upper()} τ={tau:g}: margin {curve.margin:.3f} (target {target(tau):g}), {curve.seconds:.1f} s",
                flush=True,
            )
            curves.append(curve)
    return curves


def _panel(ax: Axes, curves: list[Curve], tau: float, losses: tuple[str, ...]) -> None:
    for curve in (c for c in curves if c.tau == tau and c.loss in losses):
        ax.plot(curve.steps, curve.margins, **STYLE[curve.loss])
    ax.axhline(target(tau), **TARGET_STYLE)
    ax.annotate(
        f"1/(2τ) = {target(tau):g}",
        (1, target(tau)),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 4),
        textcoords="offset points",
        ha="right",
        va="bottom",
        fontsize=9,
    )
    ax.set(xlim=(0, curves[0].steps[-1]))
    ax.grid(alpha=0.3)


def save_plot(curves: list[Curve], taus: list[float], pairs: int, path: Path) -> None:
    """Top row: IPO (solid) and DPO (dashed) per τ, target dotted. Bottom row: the same IPO curve, close up."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(
        2, len(taus), figsize=(3.6 * len(taus) + 0.6, 6.4), squeeze=False, sharex=True, layout="constrained"
    )
    for col, tau in enumerate(taus):
        top, bottom = axes[0, col], axes[1, col]
        _panel(top, curves, tau, LOSSES)
        top.set(title=f"τ = {tau:g}: IPO and DPO", ylim=(0, None))
        _panel(bottom, curves, tau, ("ipo",))
        bottom.set(title=f"τ = {tau:g}: IPO close up", xlabel="step", ylim=(0, 1.4 * target(tau)))
    for ax in axes[:, 0]:
        ax.set_ylabel("mean margin h (nats/token)")
    handles = [Line2D([], [], **STYLE[loss]) for loss in LOSSES]
    handles.append(Line2D([], [], **TARGET_STYLE))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(f"Mean margin h on the {pairs} training pairs (token-mean log-probs)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(curves: list[Curve], taus: list[float]) -> str:
    """Markdown: one row per τ, final margins and reward accuracies of both losses."""
    rows = [
        "| τ | target 1/(2τ) | IPO margin h | DPO margin h | IPO reward accuracy | DPO reward accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for tau in taus:
        ipo, dpo = (next(c for c in curves if c.tau == tau and c.loss == loss) for loss in LOSSES)
        cells = [f"{tau:g}", f"{target(tau):g}", f"{ipo.margin:.3f}", f"{dpo.margin:.3f}"]
        cells += [f"{ipo.accuracy:.2f}", f"{dpo.accuracy:.2f}"]
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows)


def report(table_md: str, args: argparse.Namespace, argv: list[str]) -> str:
    command = shlex.join(["python", "scripts/paper_margins.py", *argv])
    return (
        "# IPO vs DPO on the tiny transformer\n\n"
        f"Produced by `{command}`. Recipe `recipes/tiny-ipo.yaml` with `objective.logps=mean` for both losses;\n"
        f"the first {args.pairs} pairs of `data/tiny-prefs/train.jsonl` are both trained and evaluated on;\n"
        f"{args.steps} steps of {BATCH} pairs, constant learning rate {args.lr:g}, seed 0.\n"
        "Margins h are the mean over those pairs at the last step, in nats per response token;\n"
        "reward accuracy is the share of pairs with h > 0.\n\n"
        f"{table_md}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="paper-margins-")))
        work.mkdir(parents=True, exist_ok=True)
        curves = train_all(args, work)
    save_plot(curves, args.taus, args.pairs, args.out / "paper-margins.png")
    table_md = table(curves, args.taus)
    (args.out / "paper-margins.md").write_text(report(table_md, args, argv), encoding="utf-8")
    print(f"\n{table_md}\n\nwrote {args.out / 'paper-margins.png'} and {args.out / 'paper-margins.md'}")
    print(f"{len(curves)} runs in {time.perf_counter() - started:.0f} s of wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
