"""`psipo bandit` through the real entry point: the paper's tabular examples (arXiv 2310.12036v2, §5.3–5.4).

Expected values are derived here from the paper's formulas, not read from `bandit.closed_form`. Runs use few
steps and seeds where the claim allows; the D1 IPO test and the DPO test use the paper's 18,000 steps and
carry the `slow` marker (~14 s together on 2 cores); the rest take about 5 s.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest

from tests.conftest import assert_clean_error

ABC = ("--actions", "a,b,c")
D1 = ("--pairs", "a>b,b>c,a>c")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def run_json(cli, *args: str) -> dict:
    """Run with --json; stdout must be exactly one JSON document."""
    result = cli("bandit", *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def by_tau(doc: dict, loss: str) -> dict[float, dict]:
    return {row["tau"]: row for row in doc["results"] if row["loss"] == loss}


@pytest.mark.slow
def test_d1_ipo_at_paper_defaults_matches_closed_form(cli):
    """Figure 1, D1 = {a≻b, b≻c, a≻c}, 18k steps, 10 seeds.

    Tabular IPO is least squares on the comparison graph with target t = 1/(2τ) on every edge:
    s_a − s_b = s_b − s_c = d and s_a − s_c = 2d; minimising 2(d − t)² + (2d − t)² gives d = 2t/3 = 1/(3τ),
    so π ∝ (1, e^(−1/(3τ)), e^(−2/(3τ))), e.g. τ = 0.5 → (0.56, 0.29, 0.15).
    """
    doc = run_json(cli, *ABC, *D1, "--loss", "ipo")
    rows = by_tau(doc, "ipo")
    assert sorted(rows) == [0.1, 0.5, 1.0]
    for tau, row in rows.items():
        weights = [math.exp(-k / (3 * tau)) for k in range(3)]
        expected = {name: w / sum(weights) for name, w in zip("abc", weights, strict=True)}
        assert row["closed_form"] == pytest.approx(expected, abs=1e-6)
        assert row["probs"] == pytest.approx(expected, abs=0.01)
        assert row["gap"] < 0.01
        assert row["psi"] == "identity"
        for name, (low, high) in row["interval"].items():
            assert low <= row["probs"][name] <= high
    assert doc["settings"]["steps"] == 18_000 and doc["settings"]["seeds"] == 10


def test_two_actions_ipo_reaches_sigmoid_half_over_tau(cli):
    """§5.3.1: one pair a≻b, target h = 1/(2τ), so π(a) = σ(0.5/τ). One pair: every batch is the same, no noise."""
    doc = run_json(cli, "--actions", "a,b", "--pairs", "a>b", "--loss", "ipo", "--steps", "3000", "--seeds", "2")
    for tau, row in by_tau(doc, "ipo").items():
        assert row["probs"]["a"] == pytest.approx(sigmoid(0.5 / tau), abs=1e-3)
        assert row["closed_form"]["a"] == pytest.approx(sigmoid(0.5 / tau), abs=1e-6)


@pytest.mark.slow
def test_two_actions_dpo_goes_deterministic_whatever_tau(cli):
    """§4.2: with a hard preference DPO's optimum is h = ∞ for every τ; after 18k steps π(a) ≥ 0.999 for τ ≤ 2."""
    taus = ("--tau", "0.5", "--tau", "1", "--tau", "2")
    doc = run_json(cli, "--actions", "a,b", "--pairs", "a>b", "--loss", "dpo", *taus, "--seeds", "2")
    rows = by_tau(doc, "dpo")
    assert sorted(rows) == [0.5, 1.0, 2.0]
    for row in rows.values():
        assert row["probs"]["a"] >= 0.999
        assert row["closed_form"] is None and row["gap"] is None


def test_cycle_stays_near_uniform_for_ipo_and_dpo(cli):
    """{a≻b, b≻c, c≻a} is symmetric under rotating the actions, so both optima are uniform.

    Batches of 9 mix the three pairs differently, so single seeds jitter (±0.06 at τ = 0.1); the mean of 10
    seeds stays within 0.05 of 1/3 (measured ≤ 0.025), while D1 at τ = 0.1 would put π(a) at 0.96.
    """
    doc = run_json(cli, *ABC, "--pairs", "a>b,b>c,c>a", "--steps", "3000")
    assert {row["loss"] for row in doc["results"]} == {"ipo", "dpo"}
    for row in doc["results"]:
        assert row["probs"] == pytest.approx(dict.fromkeys("abc", 1 / 3), abs=0.05), row
    for row in by_tau(doc, "ipo").values():
        assert row["closed_form"] == pytest.approx(dict.fromkeys("abc", 1 / 3), abs=1e-6)


def test_soft_label_psipo_logit_reaches_bradley_terry_optimum(cli):
    """ΨPO, Ψ = logit, p̂(a ≻ b) = 0.8: target (logit(p̂) − logit(1 − p̂))/(2τ) = logit(0.8)/τ = log 4/τ."""
    doc = run_json(
        cli, "--actions", "a,b", "--pairs", "a>b:0.8", "--loss", "psipo", "--psi", "logit", "--steps", "3000"
    )
    rows = by_tau(doc, "psipo")
    assert sorted(rows) == [0.1, 0.5, 1.0]
    for tau, row in rows.items():
        expected = sigmoid(math.log(0.8 / 0.2) / tau)
        assert row["psi"] == "logit"
        assert row["probs"]["a"] == pytest.approx(expected, abs=1e-3)
        assert row["closed_form"]["a"] == pytest.approx(expected, abs=1e-6)


def test_json_is_the_only_output_and_plot_is_a_png(cli, tmp_path: Path):
    plot = tmp_path / "curves.png"
    result = cli("bandit", *ABC, *D1, "--steps", "200", "--seeds", "2", "--json", "--plot", plot)
    assert result.code == 0, result.err
    doc = json.loads(result.out)  # fails on anything besides one JSON document
    assert set(doc) == {"results", "settings"}
    assert len(doc["results"]) == 6  # default losses ipo, dpo × default τ 0.1, 0.5, 1
    assert doc["settings"]["pairs"][0] == {"winner": "a", "loser": "b", "p_hat": 1.0}
    assert plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


def test_table_shows_intervals_closed_form_and_gap(cli):
    result = cli("bandit", *ABC, *D1, "--tau", "0.5", "--steps", "300", "--seeds", "3")
    assert result.code == 0, result.err
    ipo = next(line for line in result.out.splitlines() if "IPO" in line)
    dpo = next(line for line in result.out.splitlines() if "DPO" in line)
    assert "0.563  0.289  0.148" in ipo  # closed form at τ = 0.5
    assert ipo.count("[") == 3 and "—" not in ipo
    assert dpo.count("—") == 2  # no finite closed form, no gap


def test_cli_defaults_match_train_bandit():
    """The command's defaults are the paper's, and the same as `train_bandit`'s (no drift between the two)."""
    from psipo_cli.cli import bandit
    from psipo_cli.paper.bandit import train_bandit

    command, trainer = inspect.signature(bandit).parameters, inspect.signature(train_bandit).parameters
    for name in ("steps", "lr", "batch", "seeds", "seed"):
        assert command[name].default == trainer[name].default, name
    assert (trainer["steps"].default, trainer["lr"].default, trainer["batch"].default) == (18_000, 0.01, 9)
    assert list(command["loss"].default) == ["ipo", "dpo"]
    assert list(command["tau"].default) == [0.1, 0.5, 1.0]


BAD_SPECS = {
    "unknown action": (("--pairs", "a>d"), ("pair 'a>d'", "unknown action 'd'")),
    "self pair": (("--pairs", "a>b,a>a"), ("pair 'a>a'", "itself")),
    "label above 1": (("--pairs", "a>b:1.5"), ("pair 'a>b:1.5'", "outside [0, 1]")),
    "label below 0": (("--pairs", "a>b:-0.1"), ("pair 'a>b:-0.1'", "outside [0, 1]")),
    "label not a number": (("--pairs", "a>b:high"), ("pair 'a>b:high'", "'high' is not a number")),
    "tau zero": (("--pairs", "a>b", "--tau", "0.5", "--tau", "0"), ("tau", "got 0")),
    "tau negative": (("--pairs", "a>b", "--tau", "-1"), ("tau", "got -1")),
    "steps zero": (("--pairs", "a>b", "--steps", "0"), ("steps", "got 0")),
    "batch zero": (("--pairs", "a>b", "--batch", "0"), ("batch", "got 0")),
    "seeds negative": (("--pairs", "a>b", "--seeds", "-2"), ("seeds", "got -2")),
    "lr zero": (("--pairs", "a>b", "--lr", "0"), ("lr", "got 0")),
    "unknown loss": (("--pairs", "a>b", "--loss", "ipo", "--loss", "kto"), ("loss", "'kto'", "dpo, ipo, psipo")),
    "unknown psi": (("--pairs", "a>b", "--psi", "tanh"), ("psi", "'tanh'", "identity, logit")),
    "plot dir missing": (("--pairs", "a>b", "--plot", "no/such/dir/curves.png"), ("no/such/dir", "does not exist")),
    "plot not png": (("--pairs", "a>b", "--plot", "curves.pdf"), ("curves.pdf", ".png")),
}


@pytest.mark.parametrize(("args", "fragments"), list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_bad_spec_is_one_line_and_exit_2(cli, tmp_path: Path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)  # relative --plot paths resolve in tmp
    result = cli("bandit", *ABC, "--steps", "5", *args)  # a later --steps in args wins
    assert_clean_error(result, *fragments)
    assert result.out == ""
