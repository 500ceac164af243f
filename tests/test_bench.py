"""`make bench` smoke test: the driver's --quick configuration end to end (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_writes_both_trainers(tmp_path: Path) -> None:
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
        assert "trl/concat" in row["arms"]
        psipo = [arm for arm in row["arms"] if arm.startswith("psipo/")]
        assert psipo
        for arm in [*psipo, "trl/concat"]:
            figures = row["arms"][arm]
            assert figures["tokens_per_s"] > 0
            assert figures["samples_per_s"] > 0
            assert figures["peak_rss_mib"] > 0
        for arm in psipo:
            assert row["ratios"][arm]["tokens_per_s"] > 0
    assert "| data |" in proc.stdout
