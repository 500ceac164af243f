"""psipo's IPO trainer against stock TRL 1.16 `DPOTrainer(loss_type=["ipo"])`, like with like, on CPU.

Run it from the repository root:

    make bench                              # or: python bench/bench.py  (about 15 minutes on 2 cores)
    python bench/bench.py --quick           # tiny smoke configuration (about a minute)
    python bench/bench.py --out my.json     # figures to my.json instead of bench/results.json
    make bench-repeat                       # two runs in a row, then how far each ratio moved between them

What is compared. A random-init `LlamaConfig` model (fp32; hidden 512, 4 layers, 8 heads, MLP 1376, 12.7M
non-embedding parameters, the tiny tokenizer's 768-token vocabulary, saved to a temp dir with
`assets/tiny-llama`'s tokenizer, so every trainer loads the same weights from disk), a new LoRA adapter (r 16,
alpha 32, no dropout, all linear layers), IPO with τ = 0.1 (token-mean log-probs in both), constant learning rate,
seed 0, the data read in file order by every trainer. psipo is built through its own API (a recipe dict →
`psipo_cli.training.finetune.prepare` + `build_trainer`) with `training.prefix_sharing` true ("prefix-shared": one
`[prompt | chosen | rejected]` row per pair), with `training.pack_tokens` ("packed": rows filled with as many pairs
as fit, `pack_rows` rows of `pack_tokens` per step, sized to hold TRL's pair count on average) and
with prefix sharing false ("concatenated": TRL's layout, 2 rows per pair); TRL is built directly (`DPOConfig` +
`DPOTrainer(peft_config=LoraConfig(...))`), and pads as it does by default. Data shapes (bench/shapes.py): fixed
"prompt-heavy" 192 prompt + 64 + 64 response tokens and "response-heavy" 64 + 160 + 160 at max_length 512 (batch
4), "long-context" 1536 + 256 + 256 at max_length 2048 (batch 2), and lengths drawn like UltraFeedback's
("uf-like", max_length 1024, batch 4) and HH-RLHF's ("hh-like", max_length 512, batch 8).

How it is timed: a race per configuration (bench/race.py). Every arm runs in its own process, all alive at once,
and they take turns: each builds its trainer, then one training step each, round and round, the arms' order
alternating between configurations. A drift of the machine's speed (±15% over minutes here) so hits every arm
alike, while the arms waiting for their turn sleep, so nothing competes for the CPU. Each turn is timed from being
handed the turn (the batch is fetched and collated inside it) to the end of the optimizer step. The first `warmup`
steps are left out of tokens/s, MFU and the ratio to TRL, which come from the rest; every arm records the pairs it
collated at each step, the same pairs for every arm but a packed one, whose steps hold as many as fit (checked:
an arm reading a pair count must have read the file in order). The ratio's spread is the ratio of each third of
those steps on its own. The whole-run ratio is
train()'s wall time with every step (the first holds train()'s set-up and psipo's self-check), as a user's
clock sees a short run. Peak RSS is each process's own (VmHWM, model load included). The CPU time other
processes take during the turns is measured (`foreign_cpu_share`): on 2 threads and 2 cores any other busy process
slows every step several-fold.

Numbers:
- tokens/s: real training tokens per second, counted from the pairs each arm collated, the same way for every
  trainer: prompt + chosen + rejected, prompt counted once, no padding.
- MFU: model FLOPs / measured matmul peak. Per pair: (4 + 2r)·N·T + (3 + r)·4·n_layer·d_attn·C, where T = its
  real tokens, N = non-embedding parameters (transformer blocks only), 4N = the frozen policy's forward +
  activation gradients (no weight gradients under LoRA), 2N = the reference forward (r = 1 when computed per
  step, 0 when precomputed), C = Σ over its tokens of their causal context (a response token's includes the
  prompt), attention backward = 2× its forward. The same count for every trainer, so MFU ratios equal throughput
  ratios: work a layout repeats or pads is not counted as useful, nor is checkpointing's recomputation. The peak is
  the best timed 2048² fp32 `torch.mm` on the same threads, at the start and end of the run.
- precompute: with a precomputed reference the pass over the dataset happens while the trainer is built; it is
  timed on its own (`precompute_s`) and is not in any step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # measure this checkout's psipo, whatever else is installed

from race import STEP, PipeArm, run_turns  # noqa: E402
from report import TRL, agreement, data_table, race_figures, table  # noqa: E402
from workers import THREADS, WORKERS  # noqa: E402

DEFAULT_OUT = BENCH / "results.json"
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "WANDB_MODE": "disabled",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    # glibc malloc serves every tensor over 32 MiB with a fresh mmap and unmaps it when freed, so each step of a
    # large padded batch page-faults its activations in again, at a cost that depends on the host's memory state:
    # TRL's steps of the same batch took 3.7 s in one run and 6.8 s in another. Keeping freed memory in the heap
    # (no mmap, no trim), as a GPU's caching allocator does, times the layouts' compute rather than the kernel's
    # page faults, and removes that noise (README, "Benchmark against stock TRL", for what it changed).
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}


def _config(shape: str, arms: tuple[str, ...] = ("shared",), gc: bool = False, precompute: bool = False, **kw: Any):
    return {"shape": shape, "arms": [f"psipo/{a}" for a in arms], "gc": gc, "precompute": precompute, **kw}


FULL = {
    "model": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 1376},
    "shapes": {
        "prompt-heavy": {"batch": 4, "max_length": 512},
        "response-heavy": {"batch": 4, "max_length": 512},
        # Packed arms fill pack_rows rows of pack_tokens per step (token_budget.py), chosen so that a step holds as
        # many pairs as TRL's on average (4.0 and 8.0 on these lengths): the same work per step, the same memory.
        "uf-like": {"batch": 4, "max_length": 1024, "pack_tokens": 1536, "pack_rows": 2},
        "hh-like": {"batch": 8, "max_length": 512, "pack_tokens": 768, "pack_rows": 3},
        "long-context": {"batch": 2, "max_length": 2048},
    },
    "configs": [
        _config("prompt-heavy", ("shared", "concat")),
        _config("response-heavy"),
        _config("prompt-heavy", gc=True),
        _config("response-heavy", gc=True),
        _config("prompt-heavy", precompute=True),
        _config("response-heavy", precompute=True),
        _config("uf-like", ("shared", "packed")),
        _config("hh-like", ("shared", "packed")),
        _config("long-context", warmup=1, steps=6),
    ],
    "warmup": 2,  # race steps left out: the first builds the optimizer and runs psipo's self-check
    "steps": 12,  # timed race steps per arm
    "blocks": 3,  # the ratio's spread: the ratio of each third of the timed steps
}
QUICK = {
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 172},
    "shapes": {"hh-like": {"batch": 4, "max_length": 256, "pack_tokens": 512, "pack_rows": 2}},
    "configs": [_config("hh-like", ("shared", "packed"))],
    "warmup": 1,
    "steps": 3,
    "blocks": 3,
}


def _env(work: Path) -> dict[str, str]:
    # A datasets cache of its own per process, so no cached precompute is reused.
    return {**os.environ, **ENV, "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="hf-datasets-", dir=work)}


def _command(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]


def _result(stdout: str, stderr: str, returncode: int, what: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        raise SystemExit(f"bench worker failed ({what}):\n{stderr[-4000:]}")
    return json.loads(lines[-1])


def run_one(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one worker in a fresh process."""
    proc = subprocess.run(_command(spec), cwd=REPO, env=_env(work), capture_output=True, text=True, check=False)
    return _result(proc.stdout, proc.stderr, proc.returncode, spec["kind"])


def run_race(spec: dict[str, Any], arms: list[str], work: Path) -> dict[str, Any]:
    """Every arm in its own process, taking turns (race.py); each arm's figures and the order of the turns."""
    pipes, procs, outputs = [PipeArm() for _ in arms], [], []
    try:
        for arm, pipe in zip(arms, pipes, strict=True):
            # Output to files: a child blocked on a full pipe would never end its turn.
            out = [tempfile.TemporaryFile("w+", dir=work) for _ in range(2)]  # noqa: SIM115 - closed with work
            cmd = _command({**spec, "kind": "arm", "arm": arm, "fds": pipe.child_fds()})
            procs.append(
                subprocess.Popen(cmd, cwd=REPO, env=_env(work), stdout=out[0], stderr=out[1], pass_fds=pipe.child_fds())
            )
            pipe.started()
            outputs.append(out)
        for pipe in pipes:  # every arm loaded before the first turn: no start-up competes with a turn
            if pipe.done() != STEP:
                raise SystemExit("a bench arm ended before its first turn")
        order = run_turns(pipes, settle_s=0.05)
        results = {}
        for arm, proc, (stdout, stderr) in zip(arms, procs, outputs, strict=True):
            proc.wait()
            stdout.seek(0), stderr.seek(0)
            results[arm] = _result(stdout.read(), stderr.read(), proc.returncode, arm)
        return {"arms": results, "turn_order": "".join(order)}
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
        for pipe in pipes:
            pipe.close()


def resolve(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every configuration with its shape's settings and the plan's step counts filled in."""
    rows = []
    for config in plan["configs"]:
        steps = {key: config.get(key, plan[key]) for key in ("warmup", "steps")}
        rows.append({**plan["shapes"][config["shape"]], **config, **steps})
    return rows


def pairs_needed(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each shape's settings and how many pairs its longest run reads."""
    shapes = {name: dict(shape, pairs=0) for name, shape in plan["shapes"].items()}
    for row in resolve(plan):
        shape = shapes[row["shape"]]
        # A packed arm's steps hold as many pairs as fit, TRL's `batch` on average: half as many again to spare.
        spare = 1.5 if "pack_rows" in shape else 1
        shape["pairs"] = max(shape["pairs"], math.ceil(spare * row["batch"] * (row["warmup"] + row["steps"])))
    return shapes


def measure_row(row: dict[str, Any], work: Path, index: int, log: Any) -> dict[str, Any]:
    """A configuration's race; the arms' order in the rotation alternates from one configuration to the next."""
    spec = {
        "model": str(work / "model"),
        "data": str(work / f"{row['shape']}.jsonl"),
        "steps": row["warmup"] + row["steps"],
        **{key: row.get(key) for key in ("batch", "max_length", "pack_tokens", "pack_rows", "gc", "precompute")},
    }
    arms = [*row["arms"], TRL]
    race = run_race(spec, arms if index % 2 == 0 else arms[::-1], work)
    foreign = max(arm["foreign_cpu_share"] for arm in race["arms"].values())
    title = f"{row['shape']:<15} gc={row['gc']!s:<5} precompute={row['precompute']!s:<5}"
    log(
        f"  {title} "
        + ", ".join(f"{a} {r['train_s']:.1f}s" for a, r in race["arms"].items())
        + f"; other processes {foreign:.0%} CPU"
    )
    return {**row, "psipo_arms": row["arms"], "race": race}


def measure(plan: dict[str, Any], log: Any) -> dict[str, Any]:
    started = time.perf_counter()
    shapes = pairs_needed(plan)
    with tempfile.TemporaryDirectory(prefix="psipo-bench-") as tmp:
        work = Path(tmp)
        meta = run_one({"kind": "setup", "dir": str(work), "model": plan["model"], "shapes": shapes}, work)
        peaks = [run_one({"kind": "peak", "n": 2048, "trials": 5}, work)["gflops"]]
        log(f"model: {meta['params_non_embedding'] / 1e6:.1f}M non-embedding params; peak {peaks[0]:.1f} GFLOP/s")
        rows = [measure_row(row, work, index, log) for index, row in enumerate(resolve(plan))]
        peaks.append(run_one({"kind": "peak", "n": 2048, "trials": 5}, work)["gflops"])
    peak = max(peaks)
    for row in rows:
        row["arms"] = race_figures(row, {**plan, **row}, meta, peak)
    foreign = [arm["foreign_cpu_share"] for row in rows for arm in row["race"]["arms"].values()]
    return {
        "plan": {**plan, "shapes": shapes},
        "model": meta,
        "foreign_cpu_share_max": max(foreign),
        "foreign_cpu_share_median": statistics.median(foreign),
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_runs": peaks,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def machine() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "cpus_visible": os.cpu_count(),
        "threads": THREADS,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: metadata.version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (about a minute)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON of all figures (default {DEFAULT_OUT})")
    parser.add_argument("--only", default=None, help="comma-separated data shapes to run (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="timed race steps per arm")
    parser.add_argument("--against", type=Path, default=None, help="an earlier run's JSON: print how the ratios agree")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        spec = json.loads(args.one)
        print(json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
        return
    plan = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        plan["steps"] = args.steps
    if args.only:
        keep = args.only.split(",")
        plan["configs"] = [c for c in plan["configs"] if c["shape"] in keep]
        plan["shapes"] = {name: s for name, s in plan["shapes"].items() if name in keep}
        if not plan["configs"]:
            raise SystemExit(f"--only {args.only}: no such data shape (have {', '.join(FULL['shapes'])})")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load = os.getloadavg()
    if load[0] > 1.0:
        log(f"warning: 1-minute load average {load[0]:.1f} before starting: other processes compete for the CPU")
    results = {"machine": machine(), "quick": args.quick, **measure(plan, log)}
    results["loadavg_1m_start_end"] = [load[0], os.getloadavg()[0]]
    results["table"] = table(results)
    results["data_table"] = data_table(results)
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(results["table"] + "\n\n" + results["data_table"])
    if results["foreign_cpu_share_max"] > 0.1:
        print(
            f"\nwarning: other processes used up to {results['foreign_cpu_share_max']:.0%} of the CPU during timed "
            "steps: these timings are not clean"
        )
    if args.against is not None:
        text, off = agreement(results, json.loads(args.against.read_text(encoding="utf-8")))
        print(f"\nagainst {args.against}: {off} ratio(s) differ by more than 5%\n{text}")
    print(
        f"\n{results['machine']['cpu']}, {THREADS} threads, torch {results['machine'].get('torch')}; "
        f"matmul peak {results['matmul_peak_gflops']:.0f} GFLOP/s; wall {results['wall_s'] / 60:.1f} min; "
        f"figures in {out}"
    )


if __name__ == "__main__":
    main()
