"""From the workers' raw timings to the benchmark's figures and its markdown tables."""

from __future__ import annotations

from typing import Any

from shapes import contexts

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


def _rate(seconds: list[float], tokens: list[int]) -> float:
    return sum(tokens) / sum(seconds)


def race_figures(row: dict[str, Any], plan: dict[str, Any], meta: dict[str, Any], peak: float) -> dict[str, Any]:
    """Per arm: tokens/s, samples/s and MFU over the timed steps, counted from the pairs the arm collated at each
    step (`batches`). Per psipo arm, its ratios to TRL: of tokens/s over the timed steps, with their spread (the
    ratio of each of `plan['blocks']` blocks of consecutive steps), of the whole train() run (every step's tokens
    over train()'s time), of the first step's time, and of peak RSS (> 1: psipo uses more). Arms reading a pair
    count must have read the file's pairs in order, all the same: checked against the data."""
    shape = meta["shapes"][row["shape"]]
    warmup = plan["warmup"]
    in_order = step_tokens(shape["tokens"], row["batch"], warmup + plan["steps"])
    arms: dict[str, Any] = {}
    for arm, run in row["race"]["arms"].items():
        tokens = [sum(map(sum, step)) for step in run["batches"]]
        if arm != "psipo/packed" and tokens != in_order:
            raise SystemExit(f"bench: {arm} did not train on the file's pairs in order ({tokens} != {in_order})")
        timed = run["batches"][warmup:]
        seconds = sum(run["turn_s"][warmup:])
        flops = sum(flops_per_pair(meta, sum(p), contexts(*p), not row["precompute"]) for step in timed for p in step)
        arms[arm] = {
            "tokens_per_s": sum(tokens[warmup:]) / seconds,
            "samples_per_s": sum(map(len, timed)) / seconds,
            "mfu": flops / seconds / (peak * 1e9),
            "first_step_s": run["turn_s"][0],
            "step_s": run["turn_s"][warmup:],
            "step_tokens": tokens[warmup:],
            "step_pairs": [len(step) for step in timed],
            "whole_run_tokens_per_s": sum(tokens) / run["train_s"],
            **{key: run[key] for key in ("train_s", "rss_peak_mib", "precompute_s", "build_s", "train_loss")},
        }
    trl = arms[TRL]
    for arm, mine in arms.items():
        if arm == TRL:
            continue
        mine["ratio"] = mine["tokens_per_s"] / trl["tokens_per_s"]
        count = plan["blocks"]
        theirs = zip(blocks(trl["step_s"], count), blocks(trl["step_tokens"], count), strict=True)
        ours = zip(blocks(mine["step_s"], count), blocks(mine["step_tokens"], count), strict=True)
        mine["ratio_blocks"] = [_rate(*m) / _rate(*t) for m, t in zip(ours, theirs, strict=True)]
        mine["whole_run_ratio"] = mine["whole_run_tokens_per_s"] / trl["whole_run_tokens_per_s"]
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
    """The length statistics of every shape's data, as drawn, and for packed shapes the padding of their batches."""
    lines = [
        "| data | pairs | batch | max_length | prompt median / mean / p90 / max | response median / mean / p90 / max "
        "| packed: rows × tokens, pairs a step, padding by pair count → by tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, shape in results["model"]["shapes"].items():
        data = results["plan"]["shapes"][name]
        stats = shape["statistics"]
        cells = [" / ".join(f"{stats[col][k]:g}" for k in ("median", "mean", "p90", "max")) for col in stats]
        packing = shape.get("packing")
        packed = (
            f"{data['pack_rows']} × {data['pack_tokens']}, {packing['pairs_per_step_by_tokens']:.1f}, "
            f"{packing['padding_pair_count']:.0%} → {packing['padding_by_tokens']:.0%}"
            if packing
            else ""
        )
        lines.append(
            f"| {name} | {data['pairs']} | {data['batch']} | {data['max_length']} | {' | '.join(cells)} | {packed} |"
        )
    return "\n".join(lines)
