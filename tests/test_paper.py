"""`make paper` (scripts/paper_margins.py) end to end at toy size: it trains through psipo and writes its outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_paper_script_writes_the_plot_and_a_table_row_per_tau(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import paper_margins as paper

    argv = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert paper.main([*argv, "--taus", "1", "--steps", "6", "--pairs", "16", "--eval-every", "3"]) == 0
    png = tmp_path / "out" / "paper-margins.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    text = (tmp_path / "out" / "paper-margins.md").read_text(encoding="utf-8")
    assert "python scripts/paper_margins.py --out" in text, "the table names the command that made it"
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1, text
    tau, goal, *values = (float(cell) for cell in rows[0])  # every cell is a number
    assert (tau, goal) == (1.0, 0.5)
    assert len(values) == 4 and all(0 <= v <= 1 for v in values[2:]), values  # accuracies are shares
