"""`psipo bandit` through the real entry point: the paper's tabular examples (arXiv 2310.12036v2, §5.3–5.4).

Expected values are derived here from the paper's formulas, not read from `bandit.closed_form`. Runs use few
steps and seeds where the claim allows; the D1 IPO test and the DPO test use the paper's 18,000 steps and
carry the `slow` marker (~14 s together on 2 cores); the rest take about 8 s.
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
    """The command's defaults are the paper's, and the same as `train_bandit`'s and `train_online`'s (no drift)."""
    from psipo_cli.cli import bandit
    from psipo_cli.paper.bandit import train_bandit
    from psipo_cli.paper.bandit_online import train_online

    command, trainer = inspect.signature(bandit).parameters, inspect.signature(train_bandit).parameters
    online = inspect.signature(train_online).parameters
    for name in ("steps", "lr", "batch", "seeds", "seed"):
        assert command[name].default == trainer[name].default == online[name].default, name
    assert command["mixture"].default == online["mixture"].default == 0.0
    assert (trainer["steps"].default, trainer["lr"].default, trainer["batch"].default) == (18_000, 0.01, 9)
    assert list(command["loss"].default) == ["ipo", "dpo"]
    assert list(command["tau"].default) == [0.1, 0.5, 1.0]


SKEWED_CYCLE = ("--pairs", "a>b:0.9,b>c:0.7,c>a:0.6")


def test_online_ipo_reports_the_nash_equilibrium_and_the_preference_matrix(cli):
    """Online IPO's closed form is the Nash equilibrium π ∝ exp(P(· ≻ π)/τ) (π_ref uniform): checked here from the
    printed π and P, as log π(y) − Σ_y' P(y ≻ y')π(y')/τ being the same for every y. Offline IPO on the same pairs
    is least squares on the comparison graph and lands elsewhere at τ = 0.2 (0.513, 0.223, 0.264 against 0.441,
    0.206, 0.354). 1,500 steps, 4 seeds: measured within 0.01 of the closed form."""
    tau = 0.2
    args = ("--loss", "online-ipo", "--loss", "ipo", "--tau", str(tau), "--steps", "1500", "--seeds", "4")
    doc = run_json(cli, *ABC, *SKEWED_CYCLE, *args)
    p = doc["settings"]["preference"]
    assert (p["a"]["b"], p["c"]["a"], p["b"]["b"]) == (0.9, 0.6, 0.5)
    assert p["a"]["c"] == pytest.approx(0.4, abs=1e-12)
    assert doc["settings"]["mixture"] == 0.0
    online, offline = by_tau(doc, "online-ipo")[tau], by_tau(doc, "ipo")[tau]
    pi = online["closed_form"]
    residual = [math.log(pi[y]) - sum(p[y][z] * pi[z] for z in "abc") / tau for y in "abc"]
    assert max(residual) - min(residual) < 1e-9
    assert online["probs"] == pytest.approx(pi, abs=0.03)
    assert online["psi"] == "identity"
    assert max(abs(offline["closed_form"][y] - pi[y]) for y in "abc") > 0.05


@pytest.mark.parametrize(("mixture", "name"), [("0", "online IPO"), ("0.5", "IPO-MD (β=0.5)")])
def test_online_table_names_the_row_and_shows_the_uniform_equilibrium_of_the_cycle(cli, mixture, name):
    """a≻b, b≻c, c≻a at 0.8: rotating the actions maps the game to itself, so its equilibrium is uniform."""
    args = ("--loss", "online-ipo", "--tau", "0.5", "--steps", "200", "--seeds", "2", "--mixture", mixture)
    result = cli("bandit", *ABC, "--pairs", "a>b:0.8,b>c:0.8,c>a:0.8", *args)
    assert result.code == 0, result.err
    row = next(line for line in result.out.splitlines() if name in line)
    assert "0.333  0.333  0.333" in row and row.count("[") == 3
    assert "Nash equilibrium" in result.out  # the caption says what the closed form is


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
    "online pair twice": (("--pairs", "a>b:0.8,a>b:0.7", "--loss", "online-ipo"), ("pair 'a>b:0.7'", "already given")),
    "online pair contradicted": (
        ("--pairs", "a>b:0.8,b>a:0.3", "--loss", "ipo", "--loss", "online-ipo"),
        ("pair 'b>a:0.3'", "contradicts 'a>b:0.8'"),
    ),
    "online dpo": (("--pairs", "a>b", "--loss", "online-dpo"), ("loss", "'online-dpo'", "online-ipo, online-psipo")),
    "mixture above 1": (("--pairs", "a>b", "--loss", "online-ipo", "--mixture", "1.5"), ("mixture", "got 1.5")),
    "mixture without online loss": (("--pairs", "a>b", "--mixture", "0.5"), ("mixture", "online-ipo")),
}


@pytest.mark.parametrize(("args", "fragments"), list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_bad_spec_is_one_line_and_exit_2(cli, tmp_path: Path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)  # relative --plot paths resolve in tmp
    result = cli("bandit", *ABC, "--steps", "5", *args)  # a later --steps in args wins
    assert_clean_error(result, *fragments)
    assert result.out == ""
