"""`psipo frontier`'s outputs: the JSON document, the table (markdown), the frontier and over-training figures.

Seeds are pooled prompt by prompt: every seed is judged on the same prompts, so each prompt's values are averaged
over seeds first and the 95% interval is taken across prompts (the prompt effect is shared by the seeds, not
independent). The seeds' own range is shown beside it: with two seeds, the spread of training itself is reported,
not folded into a t-interval that would say little.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psipo_cli.paper.gold import Estimate

SOFT = "-soft"  # the control methods, trained on many comparisons per pair
STYLE: dict[str, dict[str, Any]] = {
    "dpo": {"color": "C1", "marker": "o", "label": "DPO"},
    "ipo": {"color": "C0", "marker": "s", "label": "IPO"},
    "psipo-logit": {"color": "C4", "marker": "D", "label": "ΨPO logit, reward-model p̂"},
    "rlhf": {"color": "C3", "marker": "^", "label": "RLHF (RLOO)"},
    "online-ipo": {"color": "C2", "marker": "v", "label": "online IPO"},
    "dpo-soft": {"color": "C1", "marker": "o", "label": "DPO, soft p̂ (control)", "ls": "--", "mfc": "none"},
    "ipo-soft": {"color": "C0", "marker": "s", "label": "IPO, soft p̂ (control)", "ls": "--", "mfc": "none"},
}
METRICS = ("win_rate", "kl", "gold_reward")


@dataclass
class Cell:
    """One (method, τ) over seeds: per metric the seeds' mean, pooled 95% half-width and the seeds' values."""

    method: str
    tau: float
    mean: dict[str, float]
    ci95: dict[str, float]
    seeds: dict[str, list[float]]


def _pool(values: list[dict[str, Any]]) -> tuple[float, float, list[float]]:
    """(mean, 95% half-width, the seeds' means) of one measure of one (method, τ)'s final policies."""
    per_prompt = [statistics.fmean(column) for column in zip(*(v["per_prompt"] for v in values), strict=True)]
    pooled = Estimate.of(per_prompt)
    return pooled.mean, pooled.half_width, [v["mean"] for v in values]


def cells(doc: dict[str, Any]) -> list[Cell]:
    """The final policies of every (method, τ), seeds pooled, in the document's method and τ order."""
    grouped: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for run in doc["runs"]:
        grouped[run["method"], run["tau"]].append(run["curve"][-1])
    out = []
    for (method, tau), finals in grouped.items():
        pooled = {key: _pool([f[key] for f in finals]) for key in METRICS}
        mean, half, seeds = ({k: v[i] for k, v in pooled.items()} for i in range(3))
        out.append(Cell(method, tau, mean, half, seeds))
    return out


def curves(doc: dict[str, Any], method: str, tau: float) -> dict[str, list[float]]:
    """Seed-mean over-training curves of one (method, τ): judged steps and metrics, and the logged train margin."""
    runs = [r for r in doc["runs"] if r["method"] == method and r["tau"] == tau]
    steps = [point["step"] for point in runs[0]["curve"]]
    out: dict[str, list[float]] = {"step": steps}
    for key in METRICS:
        out[key] = [statistics.fmean(r["curve"][i][key]["mean"] for r in runs) for i in range(len(steps))]
    logged = [[m for m in r["train_log"] if "margin" in m] for r in runs]
    if all(logged):
        out["log_step"] = [m["step"] for m in logged[0]]
        out["margin"] = [statistics.fmean(log[i]["margin"] for log in logged) for i in range(len(logged[0]))]
    return out


def _cell_text(cell: Cell, key: str, digits: int) -> str:
    spread = (
        "" if len(cell.seeds[key]) < 2 else f" [{min(cell.seeds[key]):.{digits}f}, {max(cell.seeds[key]):.{digits}f}]"
    )
    return f"{cell.mean[key]:.{digits}f} ± {cell.ci95[key]:.{digits}f}{spread}"


def table(doc: dict[str, Any]) -> str:
    """Markdown: one row per (method, τ): gold win rate and KL of the final policies."""
    rows = [
        "| method | τ | gold win rate vs π_ref | KL(π‖π_ref), nats | mean gold reward r* |",
        "|---|---|---|---|---|",
    ]
    for cell in cells(doc):
        name = STYLE.get(cell.method, {}).get("label", cell.method)
        texts = (_cell_text(cell, "win_rate", 3), _cell_text(cell, "kl", 1), _cell_text(cell, "gold_reward", 2))
        rows.append(f"| {name} | {cell.tau:g} | {' | '.join(texts)} |")
    return "\n".join(rows)


def data_table(doc: dict[str, Any]) -> str:
    """Markdown: what each seed's data and reward model were, and π_ref judged against another draw of itself."""
    rows = [
        "| seed | pairs | hard label agrees with r* | soft p̂ mean | soft p̂ = 1 | reward model agrees with r*: "
        "training pairs, held-out pairs | π_ref: mean r*, win rate against another draw of π_ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, info in doc["data"].items():
        agrees = info.get("reward_model_agrees_with_gold")
        ref = info["reference"]
        columns = [
            seed,
            str(info["pairs"]),
            f"{info['hard_agrees_with_gold']:.3f}",
            f"{info['soft_p_hat_mean']:.3f}",
            f"{info['soft_deterministic_share']:.3f}",
            "—" if agrees is None else f"{agrees['training_pairs']:.3f}, {agrees['held_out_pairs']:.3f}",
            f"{ref['gold_reward']['mean']:.2f}, {ref['win_rate']['mean']:.3f} ± {ref['win_rate']['ci95']:.3f}",
        ]
        rows.append(f"| {' | '.join(columns)} |")
    return "\n".join(rows)


def markdown(doc: dict[str, Any], command: str) -> str:
    s = doc["settings"]
    return (
        "# Gold win rate against KL: the paper's claim on generations\n\n"
        f"Produced by `{command}` in {doc['seconds'] / 60:.1f} minutes. Gold reward: {doc['gold']['reward']} "
        f"(seed {doc['gold']['seed']}, scale {doc['gold']['scale']:g}). {s['seeds']} seed(s), τ ∈ "
        f"{{{', '.join(f'{t:g}' for t in s['taus'])}}}, {s['steps']} steps at constant learning rate "
        f"{s['learning_rate']:g}, 32 sampled responses per step for every method; judged on {s['eval_prompts']} "
        f"held-out prompts × {s['samples_per_prompt']} samples (temperature 1, ≤ {s['max_new_tokens']} tokens).\n\n"
        "Cells: mean over seeds ± 95% interval over prompts (pooled), [seeds' range].\n\n"
        f"{table(doc)}\n\n## Data and reward model per seed\n\n{data_table(doc)}\n"
    )


def write_outputs(doc: dict[str, Any], out: Path, command: str) -> list[Path]:
    """frontier.json, frontier.md, frontier.png and frontier-training.png in `out`."""
    paths = [out / name for name in ("frontier.json", "frontier.md", "frontier.png", "frontier-training.png")]
    paths[0].write_text(json.dumps(_rounded(doc | {"command": command}), indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(doc, command), encoding="utf-8")
    _frontier_plot(doc, paths[2])
    _training_plot(doc, paths[3])
    return paths


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (the JSON's size halves; no measured figure has more precision)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _frontier_plot(doc: dict[str, Any], path: Path) -> None:
    """Gold win rate against KL(π‖π_ref): one curve per method through its τ values, 95% intervals both ways."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    by_method: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells(doc):
        by_method[cell.method].append(cell)
    for method, row in by_method.items():
        row.sort(key=lambda c: c.mean["kl"])
        style = {"ls": "-", **STYLE.get(method, {"label": method})}
        ax.errorbar(
            [c.mean["kl"] for c in row],
            [c.mean["win_rate"] for c in row],
            xerr=[c.ci95["kl"] for c in row],
            yerr=[c.ci95["win_rate"] for c in row],
            capsize=2,
            lw=1.5,
            **style,
        )
        for c in row:
            ax.annotate(
                f"{c.tau:g}",
                (c.mean["kl"], c.mean["win_rate"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="π_ref (win rate ½, KL 0)")
    # symlog: logarithmic above 1 nat, linear (and defined for 0 or a slightly negative estimate) below it
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=min(0.0, *(c.mean["kl"] for c in cells(doc))))
    ax.set(xlabel="KL(π‖π_ref), nats per response (symmetric log scale)", ylabel="gold win rate against π_ref")
    ax.set_title("Final policies: gold win rate against KL, one curve per method across τ (labels: τ)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)
    plt.close(fig)


ROWS = (
    ("win_rate", "gold win rate vs π_ref"),
    ("gold_reward", "mean gold reward r*"),
    ("kl", "KL(π‖π_ref), nats"),
    ("margin", "training margin h, nats\n(online: on fresh samples)"),
)


def _training_plot(doc: dict[str, Any], path: Path) -> None:
    """Per τ (columns): gold win rate, gold reward and KL of the judged checkpoints and the logged training margin
    against step (rows); seed means. RLHF logs no margin (it has no pairs)."""
    plt = _pyplot()
    taus, methods = doc["settings"]["taus"], doc["settings"]["methods"]
    fig, axes = plt.subplots(
        len(ROWS), len(taus), figsize=(4.2 * len(taus) + 0.8, 11), squeeze=False, sharex=True, layout="constrained"
    )
    for col, tau in enumerate(taus):
        for method in methods:
            curve = curves(doc, method, tau)
            style = {"ls": "-", **STYLE.get(method, {"label": method}), "ms": 3}
            for row, (key, _) in enumerate(ROWS[:-1]):
                axes[row, col].plot(curve["step"], curve[key], **style)
            if "margin" in curve:
                axes[-1, col].plot(curve["log_step"], curve["margin"], **{**style, "marker": None})
        axes[0, col].set_title(f"τ = {tau:g}")
        axes[0, col].axhline(0.5, color="grey", lw=0.8, ls=":")
        axes[-1, col].axhline(1 / (2 * tau), color="black", lw=1, ls=":", label="IPO's target 1/(2τ)")
        axes[-1, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    for row, (_, label) in enumerate(ROWS):
        axes[row, 0].set_ylabel(label)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    extra = axes[-1, 0].get_legend_handles_labels()
    fig.legend(
        handles + extra[0][-1:], labels + extra[1][-1:], loc="outside lower center", ncol=4, fontsize=8, frameon=False
    )
    fig.suptitle("Over training (seed means): the judged checkpoints, and the logged training margin at the bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)
