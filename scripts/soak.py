"""A long run under load: many logged steps and checkpoints, killed and resumed, with disk use and resume time measured.

    make soak                                   # 10,000 steps, a checkpoint every 200 (50), save_total_limit 2
    python scripts/soak.py --steps 400 --save-every 20 --out soak.json

The tiny model trains `--steps` steps with a metrics line every step. A watcher samples the run directory's size and
its checkpoint folders every 0.2 s. The run is killed (SIGKILL) right after an early checkpoint and resumed, and
at the end extended by a few steps and resumed from its last checkpoint: resume time (process start to its first
new metrics line) early and late tells whether resuming grows with the run (metrics.jsonl rewritten, batches
skipped, checkpoints scanned). Figures go to JSON and a line each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from psipo_cli.run.checkpoints import COMPLETE_MARK, checkpoints  # noqa: E402
from psipo_cli.run.directory import read_metrics  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def recipe(run_dir: Path, steps: int, save_every: int, keep: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(REPO / "assets" / "tiny-llama"), "dtype": "float32"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(REPO / "data" / "tiny-prefs" / "train.jsonl"), "max_length": 64},
        "objective": {"loss": "ipo", "tau": 0.5},
        "training": {
            "learning_rate": 1e-3,
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "save_steps": save_every,
            "save_total_limit": keep,
            "lr_scheduler_type": "constant",
            "seed": 0,
        },
        "output": {"dir": str(run_dir)},
    }


class Watcher(threading.Thread):
    """Samples the run directory: its bytes on disk and its checkpoint folders (complete or being written)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.stop = run_dir, threading.Event()
        self.max_bytes = self.max_folders = 0
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                size = sum(p.stat().st_size for p in self.run_dir.rglob("*") if p.is_file())
                folders = len(list(self.run_dir.glob("checkpoint-*")))
            except OSError:  # a file deleted while walking: rotation at work
                continue
            self.max_bytes, self.max_folders = max(self.max_bytes, size), max(self.max_folders, folders)
            self.samples.append((time.monotonic(), size))


def start(recipe_path: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "psipo_cli", "finetune", str(recipe_path), "--quiet", *args]
    return subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> float:
    """Seconds until metrics.jsonl logs `step` (polled every 10 ms)."""
    started = time.monotonic()
    while not any(m["step"] >= step for m in _tail(run_dir)):
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    return time.monotonic() - started


def _tail(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    with path.open("rb") as handle:
        offset = max(0, path.stat().st_size - 4096)
        handle.seek(offset)
        lines = handle.read().decode("utf-8", "replace").splitlines()[1 if offset else 0 :]  # a cut first line
    return [json.loads(line) for line in lines if line.endswith("}")]


def soak(steps: int, save_every: int, keep: int, work: Path) -> dict[str, Any]:
    run_dir, path = work / "run", work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(run_dir, steps, save_every, keep)), encoding="utf-8")
    watcher = Watcher(run_dir)
    watcher.start()
    started = time.monotonic()
    proc = start(path)
    first_start_s = wait_for_step(run_dir, 1, proc)
    wait_for_step(run_dir, save_every, proc)
    while not (run_dir / f"checkpoint-{save_every}" / COMPLETE_MARK).exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start(path, "--resume")
    early_resume_s = wait_for_step(run_dir, save_every + 1, proc)
    if proc.wait() != 0:
        raise SystemExit(f"the resumed run failed: {proc.stderr.read()[-2000:]}")
    train_s = time.monotonic() - started
    proc = start(path, "--resume", f"training.max_steps={steps + 5}")
    late_resume_s = wait_for_step(run_dir, steps + 1, proc)
    if proc.wait() != 0:
        raise SystemExit(f"the extended run failed: {proc.stderr.read()[-2000:]}")
    watcher.stop.set()
    watcher.join()
    logged = [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"]
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoints(run_dir)[-1].rglob("*") if p.is_file())
    return {
        "steps": steps,
        "checkpoints_written": steps // save_every + 1,
        "save_total_limit": keep,
        "train_s": round(train_s, 1),
        "steps_logged_once": logged == list(range(1, steps + 6)),
        "complete_checkpoints_at_end": [p.name for p in checkpoints(run_dir)],
        "max_checkpoint_folders_seen": watcher.max_folders,
        "max_run_dir_mib": round(watcher.max_bytes / 2**20, 2),
        "one_checkpoint_mib": round(checkpoint_bytes / 2**20, 2),
        "metrics_jsonl_mib": round((run_dir / "metrics.jsonl").stat().st_size / 2**20, 2),
        "first_start_s": round(first_start_s, 2),
        "resume_at_step_s": {str(save_every): round(early_resume_s, 2), str(steps): round(late_resume_s, 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--keep", type=int, default=2, help="training.save_total_limit")
    parser.add_argument("--out", type=Path, default=REPO / "soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="psipo-soak-") as tmp:
        figures = soak(args.steps, args.save_every, args.keep, Path(tmp))
    args.out.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    for key, value in figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
