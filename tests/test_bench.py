"""`make bench`: the data shapes, the race's turn-taking, and the driver's --quick configuration end to end (no
timing assertions)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from race import END, STEP, PipeArm, run_turns  # noqa: E402
from report import agreement, blocks, step_tokens  # noqa: E402
from shapes import DISTRIBUTIONS, contexts, draw_lengths, statistics_of  # noqa: E402


@pytest.mark.parametrize("shape", sorted(DISTRIBUTIONS))
def test_drawn_lengths_fit_max_length_and_vary(shape: str) -> None:
    lengths = draw_lengths(shape, 200, 512, seed=0)
    assert all(p + max(c, r) <= 512 and min(p, c, r) >= 1 for p, c, r in lengths)
    assert len({c for _, c, _ in lengths}) > 50  # a distribution, not a fixed shape
    assert draw_lengths(shape, 200, 512, seed=0) == lengths  # reproducible


def test_contexts_is_the_sum_of_each_tokens_causal_context() -> None:
    rng = random.Random(0)
    for _ in range(20):
        p, c, r = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
        brute = sum(range(1, p + 1)) + sum(p + j for n in (c, r) for j in range(1, n + 1))
        assert contexts(p, c, r) == brute


def test_statistics_and_step_tokens() -> None:
    stats = statistics_of([(10, 1, 3), (20, 5, 7), (30, 9, 11)])
    assert stats["prompt"] == {"median": 20, "mean": 20.0, "p90": 20, "max": 30}
    assert stats["response"]["max"] == 11 and stats["response"]["mean"] == 6.0
    assert step_tokens([1, 2, 3, 4, 5, 6], batch=2, steps=3) == [3, 7, 11]
    assert blocks(list(range(9)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


class _Arm:
    """An arm of `steps` turns, as the driver sees it."""

    def __init__(self, steps: int, log: list[int], name: int) -> None:
        self.left, self.log, self.name = steps, log, name

    def go(self) -> None:
        self.log.append(self.name)

    def done(self) -> bytes:
        self.left -= 1
        return END if self.left == 0 else STEP

    def release(self) -> None:
        self.log.append(-1 - self.name)


def test_turns_go_round_and_skip_arms_that_ended() -> None:
    log: list[int] = []
    order = run_turns([_Arm(4, log, 0), _Arm(2, log, 1), _Arm(3, log, 2)])
    # Released (negative) only once every arm has ended: no arm exits while another still works.
    assert log == [0, 1, 2, 0, 1, 2, 0, 2, 0, -1, -2, -3] and order == [str(i) for i in log if i >= 0]


def _run(*ratios: float) -> dict:
    arms = ["psipo/shared", "psipo/packed"]
    row = {"shape": "hh-like", "gc": False, "precompute": False, "psipo_arms": arms[: len(ratios)]}
    return {"rows": [{**row, "arms": {arm: {"ratio": r} for arm, r in zip(arms, ratios, strict=False)}}]}


def test_agreement_flags_ratios_that_moved_more_than_five_percent() -> None:
    text, off = agreement(_run(2.0, 1.5), _run(1.92, 1.5))  # +4.2%, 0%
    assert off == 0 and "+4.2%" in text
    text, off = agreement(_run(2.0, 1.5), _run(1.9, 1.5))  # +5.3%
    assert off == 1 and "+5.3% ✗" in text
    assert agreement(_run(2.0, 1.5), _run(2.0))[0].count("hh-like") == 1  # a row only one run has is left out


def test_pipe_arm_reports_a_dead_child_instead_of_hanging() -> None:
    arm = PipeArm()
    go, done = arm.child_fds()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"], pass_fds=(go, done))
    arm.started()
    child.wait()
    with pytest.raises(SystemExit, match="died"):
        arm.done()
    arm.close()


@pytest.mark.slow
def test_bench_quick_writes_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["rows"], results
    for row in results["rows"]:
        assert set(row["arms"]) == {*row["psipo_arms"], "trl/concat"}
        assert {arm.split("/")[1] for arm in row["psipo_arms"]} == {"shared", "packed"}
        for figures in row["arms"].values():
            assert figures["tokens_per_s"] > 0 and len(figures["step_s"]) == row["steps"]
        for arm in row["psipo_arms"]:
            assert row["arms"][arm]["ratio"] > 0 and len(row["arms"][arm]["ratio_blocks"]) == 3
            assert row["arms"][arm]["whole_run_ratio"] > 0 and row["arms"][arm]["rss_peak_mib"] > 0
    assert "| data |" in proc.stdout and "| hh-like |" in proc.stdout
