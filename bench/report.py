"""From the workers' raw timings to the benchmark's figures and its markdown tables."""

from __future__ import annotations

from typing import Any

TRL = "trl/concat"
ARM_LABEL = {"psipo/shared": "prefix-shared", "psipo/concat": "concatenated", "psipo/packed": "packed"}


def step_tokens(tokens: list[int], batch: int, steps: int) -> list[int]:
    """Real tokens of each step: the file's pairs in order, `batch` at a time."""
    return [sum(tokens[i * batch : (i + 1) * batch]) for i in range(steps)]


def flops_per_pair(meta: dict[str, Any], tokens: int, contexts: int, ref_per_step: bool) -> float:
    """Model FLOPs of one pair, the same for every trainer (see bench.py's docstring)."""
    n, layers, d = meta["params_non_embedding"], meta["n_layer"], meta["d_attn"]
    r = 1 if ref_per_step else 0
    return (4 + 2 * r) * n * tokens + (3 + r) * 4 * layers * d * contexts


def blocks(values: list[float], count: int) -> list[list[float]]:
    """`values` cut into `count` contiguous blocks of (nearly) equal size."""
    size = len(values) / count
    return [values[round(i * size) : round((i + 1) * size)] for i in range(count)]


def race_figures(row: dict[str, Any], plan: dict[str, Any], meta: dict[str, Any], peak: float) -> dict[str, Any]:
    """Per arm: tokens/s, samples/s and MFU over the timed steps; per psipo arm, its ratios to TRL: over the timed
    steps (all arms trained on the same pairs) with their spread (the ratio of each of `plan['blocks']` blocks of
    consecutive steps), of the whole train() time, of the first step, and of peak RSS (> 1: psipo uses more)."""
    shape = meta["shapes"][row["shape"]]
    warmup, batch = plan["warmup"], row["batch"]
    steps = warmup + plan["steps"]
    tokens = step_tokens(shape["tokens"], batch, steps)[warmup:]
    pairs = slice(warmup * batch, steps * batch)
    flops = sum(
        flops_per_pair(meta, t, c, not row["precompute"])
        for t, c in zip(shape["tokens"][pairs], shape["contexts"][pairs], strict=True)
    )
    arms: dict[str, Any] = {}
    for arm, run in row["race"]["arms"].items():
        turns = run["turn_s"]
        seconds = sum(turns[warmup:])
        arms[arm] = {
            "tokens_per_s": sum(tokens) / seconds,
            "samples_per_s": batch * plan["steps"] / seconds,
            "mfu": flops / seconds / (peak * 1e9),
            "first_step_s": turns[0],
            "step_s": turns[warmup:],
            **{key: run[key] for key in ("train_s", "rss_peak_mib", "precompute_s", "build_s", "train_loss")},
        }
    trl = arms[TRL]
    for arm, mine in arms.items():
        if arm == TRL:
            continue
        mine["ratio"] = sum(trl["step_s"]) / sum(mine["step_s"])
        pieces = zip(blocks(trl["step_s"], plan["blocks"]), blocks(mine["step_s"], plan["blocks"]), strict=True)
        mine["ratio_blocks"] = [sum(t) / sum(m) for t, m in pieces]
        mine["whole_run_ratio"] = trl["train_s"] / mine["train_s"]
        mine["first_step_ratio"] = trl["first_step_s"] / mine["first_step_s"]
        mine["peak_rss_ratio"] = mine["rss_peak_mib"] / trl["rss_peak_mib"]
    return arms


def _spread(figures: dict[str, Any]) -> str:
    low, high = min(figures["ratio_blocks"]), max(figures["ratio_blocks"])
    return f"{low:.2f}–{high:.2f}"


def table(results: dict[str, Any]) -> str:
    """One line per (configuration, psipo arm), TRL alongside."""
    lines = [
        "| data | grad ckpt | reference | psipo layout | tokens/s psipo / TRL | ratio (spread) | whole run "
        "| first step s psipo / TRL | peak RSS MiB psipo / TRL (ratio) | MFU psipo / TRL |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        arms = row["arms"]
        trl = arms[TRL]
        ref = "precomputed" if row["precompute"] else "per step"
        for arm in row["psipo_arms"]:
            mine = arms[arm]
            lines.append(
                f"| {row['shape']} | {'on' if row['gc'] else 'off'} | {ref} | {ARM_LABEL[arm]} "
                f"| {mine['tokens_per_s']:.0f} / {trl['tokens_per_s']:.0f} "
                f"| **{mine['ratio']:.2f}×** ({_spread(mine)}) | {mine['whole_run_ratio']:.2f}× "
                f"| {mine['first_step_s']:.1f} / {trl['first_step_s']:.1f} "
                f"| {mine['rss_peak_mib']:.0f} / {trl['rss_peak_mib']:.0f} ({mine['peak_rss_ratio']:.2f}×) "
                f"| {mine['mfu']:.1%} / {trl['mfu']:.1%} |"
            )
    return "\n".join(lines)


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    """Every ratio of a run by a label naming its row and arm."""
    ratios = {}
    for row in results["rows"]:
        ref = "precomputed" if row["precompute"] else "per step"
        for arm in row["psipo_arms"]:
            label = f"{row['shape']}, gc {'on' if row['gc'] else 'off'}, reference {ref}, {ARM_LABEL[arm]}"
            ratios[label] = row["arms"][arm]["ratio"]
    return ratios


def agreement(now: dict[str, Any], before: dict[str, Any], tolerance: float = 0.05) -> tuple[str, int]:
    """This run's ratios against an earlier run's, row by row: a markdown table, and how many rows differ by more
    than `tolerance` (relative to the earlier ratio). Rows only one run has are left out."""
    mine, theirs = _ratios(now), _ratios(before)
    lines = ["| row | this run | earlier run | difference |", "|---|---:|---:|---:|"]
    off = 0
    for label, ratio in mine.items():
        if label not in theirs:
            continue
        difference = ratio / theirs[label] - 1
        flag = " ✗" if abs(difference) > tolerance else ""
        off += bool(flag)
        lines.append(f"| {label} | {ratio:.2f}× | {theirs[label]:.2f}× | {difference:+.1%}{flag} |")
    return "\n".join(lines), off


def data_table(results: dict[str, Any]) -> str:
    """The length statistics of every shape's data, as drawn."""
    lines = [
        "| data | pairs | batch | max_length | prompt median / mean / p90 / max | response median / mean / p90 / max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, shape in results["model"]["shapes"].items():
        data = results["plan"]["shapes"][name]
        stats = shape["statistics"]
        cells = [" / ".join(f"{stats[col][k]:g}" for k in ("median", "mean", "p90", "max")) for col in stats]
        lines.append(f"| {name} | {data['pairs']} | {data['batch']} | {data['max_length']} | {' | '.join(cells)} |")
    return "\n".join(lines)
