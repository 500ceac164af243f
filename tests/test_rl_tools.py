"""After training, for the sampling stages (rlhf, online_psipo): banner, summary, model card, plots, compare, eval,
generate, merge and push work on their run directories as they do on a preference run's.

The runs are real and tiny: a reward model of a few steps, then an rlhf and an online IPO-MD run of four steps each,
against it, with six held-out pairs.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from psipo_cli.models.loading import describe_reference, load_policy
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run import display
from psipo_cli.run.directory import read_metrics
from psipo_cli.tools.card import card_metadata, model_card
from psipo_cli.tools.panels import PANELS
from psipo_cli.tools.plots import PLOTS_DIR
from psipo_cli.tools.run_metrics import load_run
from tests.conftest import TINY_DATA, assert_clean_error, tiny_recipe, write_jsonl
from tests.test_plots import assert_plots

RLHF_TAU, ONLINE_TAU, MIXTURE = 0.1, 0.5, 0.25
SHORT = {
    "max_steps": 4,
    "logging_steps": 2,
    "eval_steps": 4,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 6,
}
RL_PANELS = ("loss", "reward", "kl", "reward_vs_kl")
PROMPT = "What sound does a frog make?"


# ---------------------------------------------------------------------------------------------------------------
# The runs


def _write(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _sampling_recipe(root: Path, name: str, reward: Path, eval_data: Path, **sections: Any) -> dict[str, Any]:
    rollout = {"reward_model": str(reward), "max_new_tokens": 8, **sections.pop("rollout", {})}
    return tiny_recipe(root / name, data={"eval": str(eval_data)}, training=SHORT, rollout=rollout, **sections)


def _train_showing_banner(path: Path) -> str:
    """Train the recipe at `path` in plain mode; what the run printed."""
    from psipo_cli.training.finetune import run

    screen = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(display, "console", Console(file=screen, width=400, highlight=False, soft_wrap=True))
        run(load_recipe(path), display=display.Display("plain"))
    return screen.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, reward_run: Path) -> SimpleNamespace:
    """A 4-step rlhf run and a 4-step online IPO-MD run (Bernoulli labels) against the session's reward run."""
    root = tmp_path_factory.mktemp("rl-tools")
    rows = [json.loads(line) for line in (TINY_DATA / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
    pairs = write_jsonl(root / "six-pairs.jsonl", rows)
    prompts = write_jsonl(root / "three-prompts.jsonl", [{"prompt": row["prompt"]} for row in rows[:3]])
    rlhf = _sampling_recipe(root, "rlhf", reward_run, pairs, objective={"loss": "rlhf", "tau": RLHF_TAU})
    online = _sampling_recipe(
        root,
        "online",
        reward_run,
        pairs,
        objective={"loss": "online_psipo", "tau": ONLINE_TAU},
        rollout={"mixture": MIXTURE, "label": "bernoulli"},
    )
    return SimpleNamespace(
        root=root,
        reward=reward_run,
        prompts=prompts,
        rlhf_out=_train_showing_banner(_write(root / "rlhf.yaml", rlhf)),
        online_out=_train_showing_banner(_write(root / "online.yaml", online)),
        rlhf=root / "rlhf",
        online=root / "online",
    )


def _last(run_dir: Path, split: str) -> dict[str, Any]:
    return [m for m in read_metrics(run_dir) if m["split"] == split][-1]


def _card(run_dir: Path) -> tuple[dict[str, Any], str]:
    _, front, body = (run_dir / "README.md").read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(front), body


# ---------------------------------------------------------------------------------------------------------------
# What a run prints and leaves behind


@pytest.mark.slow
def test_banner_counts_prompts_and_describes_the_rollout(runs: SimpleNamespace) -> None:
    rlhf = runs.rlhf_out.splitlines()
    assert "objective  rlhf τ=0.1: maximise E[r] − τ·KL(π‖π_ref) (eq. 6), KL summed over each response" in rlhf
    assert any(line.startswith("data       1,200 train prompts, 6 eval prompts") for line in rlhf)
    rollout = "2 responses per prompt (RLOO, clip ε=0.2); ≤ 8 new tokens at temperature 1; reward model"
    assert f"rollout    {rollout} {runs.reward}" in rlhf
    assert any(line.startswith("reference  ") and "each batch of sampled responses" in line for line in rlhf)
    assert not any(line.startswith("layout ") for line in rlhf), "no pair layout: the samples use TRL's"
    steps = [line for line in rlhf if line.startswith(("train step", "eval  step"))]
    assert len(steps) == 3  # steps 2 and 4, and the evaluation at 4
    assert all(" reward " in line and " KL " in line and " entropy " in line for line in steps), steps

    online = runs.online_out.splitlines()
    assert any(line.startswith("objective  online_psipo τ=0.5, Ψ=identity (online IPO)") for line in online)
    assert any(
        line.startswith("rollout    one pair per prompt from π^(1−β)·π_ref^β with β=0.25 (IPO-MD), label drawn")
        for line in online
    )
    train = [line for line in online if line.startswith("train step")]
    assert all(" h " in line and " acc " in line and " reward " in line and " KL " in line for line in train)


@pytest.mark.slow
def test_summary_counts_prompts_and_records_the_rollout(runs: SimpleNamespace) -> None:
    summary = json.loads((runs.rlhf / "summary.json").read_text(encoding="utf-8"))
    assert summary["train_prompts"] == 1200 and "train_pairs" not in summary
    assert summary["layout"] is None
    assert summary["rollout"]["responses_per_prompt"] == 2 and summary["rollout"]["reward_model"] == str(runs.reward)
    assert summary["final_eval"]["kl_sequence"] == _last(runs.rlhf, "eval")["kl_sequence"]


@pytest.mark.slow
def test_the_runs_recipe_loads_back(runs: SimpleNamespace) -> None:
    for run_dir, loss in ((runs.rlhf, "rlhf"), (runs.online, "online_psipo")):
        recipe = load_recipe(run_dir / "recipe.yaml")  # what eval, generate, merge and plot start with
        assert recipe.objective.loss == loss and recipe.rollout is not None
    assert load_recipe(runs.online / "recipe.yaml").rollout.mixture == MIXTURE


# ---------------------------------------------------------------------------------------------------------------
# Model card


@pytest.mark.slow
def test_rlhf_card_states_eq6_its_tau_rloo_and_the_reward_model(runs: SimpleNamespace) -> None:
    meta, body = _card(runs.rlhf)
    assert meta["tags"] == ["psipo", "rlhf", "rloo", "trl", "lora"]
    assert "eq. 6" in body and "E_x E_{y∼π(·|x)}[r(x, y)] − τ·KL(π ‖ π_ref) with τ = 0.1" in body
    assert "RLOO" in body and "leave-one-out" in body and "k = 2" in body and "ε = 0.2" in body
    assert f"reward model of the psipo run `{runs.reward}`" in body
    assert "| prompts trained on | 1200 |" in body and "2 prompts × 2 responses per device" in body
    train, evaluation = _last(runs.rlhf, "train"), _last(runs.rlhf, "eval")
    assert f"| mean reward r (`reward`) | {train['reward']:.4g} | {evaluation['reward']:.4g} |" in body
    assert f"| KL(π‖π_ref) per sequence (`kl_sequence`) | {train['kl_sequence']:.4g} |" in body
    eq6 = evaluation["reward"] - RLHF_TAU * evaluation["kl_sequence"]
    assert "| E[r] − τ·KL, τ = 0.1 (eq. 6) | " in body and f"| {eq6:.4g} |" in body
    assert "clip_ratio/low_min" not in body, "only the headline metrics, not all of TRL's"


@pytest.mark.slow
def test_online_card_states_the_target_ipo_md_and_the_drawn_label(runs: SimpleNamespace) -> None:
    meta, body = _card(runs.online)
    assert meta["tags"] == ["psipo", "online-ipo", "ipo-md", "trl", "lora"]
    assert "Online IPO-MD" in body and "π^(1−β)·π_ref^β" in body and "β = 0.25" in body
    assert "(h − (p̂ − ½)/τ)²" in body and "τ = 0.5" in body
    assert "draw of 1" in body and f"`{runs.reward}`" in body
    assert f"| target (`target`) | {_last(runs.online, 'train')['target']:.4g} |" in body


def test_online_card_with_a_non_identity_psi_names_it(tmp_path: Path) -> None:
    sections = {
        "objective": {"loss": "online_psipo", "psi": "logit", "tau": 0.2},
        "rollout": {"reward_model": str(tmp_path / "reward"), "max_new_tokens": 8},
    }
    recipe = Recipe.model_validate(tiny_recipe(tmp_path / "run", **sections))
    card = model_card(tmp_path, recipe, {"final_train": {"step": 2, "reward": 0.5}, "final_eval": {}})
    assert "Online ΨPO with Ψ = logit" in card and "(Ψ(p̂) − Ψ(1 − p̂))/(2τ)" in card and "soft label" in card
    assert "IPO-MD" not in card and "| mean reward r (`reward`) | 0.5 |" in card
    assert card_metadata(recipe)["tags"] == ["psipo", "online-psipo", "trl", "lora"]
    assert describe_reference(recipe).endswith("(computed on each batch of sampled responses)")


# ---------------------------------------------------------------------------------------------------------------
# Plots and compare


@pytest.mark.slow
def test_plots_show_reward_kl_and_reward_against_kl(runs: SimpleNamespace) -> None:
    rlhf = (*RL_PANELS, "learning_rate")
    online = (*RL_PANELS, "margin", "reward_accuracy", "learning_rate")
    for run_dir, panels in ((runs.rlhf, rlhf), (runs.online, online)):
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        assert_plots([Path(p) for p in summary["plots"]], run_dir / PLOTS_DIR, panels)  # drawn as the run ended
    # reward against KL: one point per logged step, x = that step's KL per sequence, y = its mean reward.
    run = load_run(runs.rlhf)
    panel = next(p for p in PANELS if p.stem == "reward_vs_kl")
    train = [m for m in read_metrics(runs.rlhf) if m["split"] == "train"]
    assert panel.points(run, panel.series[0]) == ([m["kl_sequence"] for m in train], [m["reward"] for m in train])
    assert panel.xlabel == "KL(π‖π_ref) per sequence (nats)"


@pytest.mark.slow
def test_compare_overlays_sampling_runs_and_tabulates_reward_and_kl(runs: SimpleNamespace, cli) -> None:
    out = runs.root / "cmp"
    result = cli("compare", runs.rlhf, runs.online, "--out", out)
    assert result.code == 0, result.err
    header = next(line for line in result.out.splitlines() if line.startswith("┃ run"))
    columns = {cell.strip() for cell in header.split("┃")}
    assert {"loss", "reward", "KL/sequence", "margin h", "target"} <= columns
    assert "log-ratio chosen" not in columns, "neither run logs a pair's drift"
    assert "RLHF τ=0.1" in result.out and "online IPO τ=0.5, mixture β=0.25" in result.out
    row = next(line for line in result.out.splitlines() if line.startswith("│ rlhf") and "│ eval" in line)
    assert f"{_last(runs.rlhf, 'eval')['kl_sequence']:.4f}" in row
    panels = (*RL_PANELS, "margin", "reward_accuracy", "learning_rate")
    assert_plots([Path(p) for p in result.out.splitlines() if p.endswith(".png")], out, panels)


# ---------------------------------------------------------------------------------------------------------------
# psipo eval


@pytest.mark.slow
def test_eval_of_an_rlhf_run_scores_pairs_without_a_pair_loss(runs: SimpleNamespace, cli) -> None:
    result = cli("eval", runs.rlhf)
    assert result.code == 0, result.err
    assert "reward accuracy" in result.out and "mean loss" not in result.out and "target" not in result.out
    summary = json.loads((runs.rlhf / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["pairs"] == 6 and summary["loss"] is None and summary["target"] is None
    assert summary["objective"]["logps"] == "sum", "eq. 6's log-probs are whole-sequence sums"
    pairs = [json.loads(line) for line in (runs.rlhf / "eval" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and "loss" not in pairs[0]
    assert sum(p["margin"] > 0 for p in pairs) / 6 == summary["reward_accuracy"]


@pytest.mark.slow
def test_eval_of_an_online_run_scores_pairs_with_its_psipo_loss(runs: SimpleNamespace, cli) -> None:
    result = cli("eval", runs.online, "--json", "--out", runs.root / "online-eval.jsonl")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    target = 1 / (2 * ONLINE_TAU)  # identity Ψ on hard labels: (1 − ½)/τ, IPO's 1/(2τ)
    assert summary["target"] == pytest.approx(target)
    pairs = [json.loads(line) for line in (runs.root / "online-eval.jsonl").read_text().splitlines()]
    expected = sum((p["margin"] - target) ** 2 for p in pairs) / len(pairs)
    assert summary["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_eval_of_prompt_only_data_needs_generate(runs: SimpleNamespace, cli) -> None:
    result = cli("eval", runs.rlhf, "--data", runs.prompts, "--out", runs.root / "nothing.jsonl")
    assert_clean_error(result, "holds prompts only", "--generate")
    assert not (runs.root / "nothing.summary.json").exists()


@pytest.mark.slow
def test_eval_generate_scores_samples_with_the_runs_reward_model(runs: SimpleNamespace, cli) -> None:
    out = runs.root / "sampled.jsonl"
    args = ("--generate", "2", "--max-new-tokens", "6", "--out", out)
    result = cli("eval", runs.rlhf, "--data", runs.prompts, *args)
    assert result.code == 0, result.err
    assert "mean reward π / π_ref" in result.out and "E[r] − τ·KL(π‖π_ref), τ = 0.1 (eq. 6)" in result.out
    summary = json.loads((runs.root / "sampled.summary.json").read_text(encoding="utf-8"))
    assert summary["prompts"] == 3 and "pairs" not in summary and not out.exists()
    generation = summary["generation"]
    assert generation["prompts"] == 3 and generation["reward_model"] == str(runs.reward)
    assert math.isfinite(generation["reward_policy"]) and math.isfinite(generation["reward_reference"])
    eq6 = generation["reward_policy"] - RLHF_TAU * generation["kl_policy_reference"]
    assert generation["rlhf_objective"] == pytest.approx(eq6)


# ---------------------------------------------------------------------------------------------------------------
# generate, merge, push


@pytest.mark.slow
def test_generate_answers_with_a_sampling_runs_policy(runs: SimpleNamespace, cli) -> None:
    result = cli("generate", runs.rlhf, "-p", PROMPT, "--max-new-tokens", "6", "--seed", "0")
    assert result.code == 0, result.err
    assert result.out.startswith(f"> {PROMPT}\n") and "trained policy" in result.err


@pytest.mark.slow
def test_merge_of_an_online_run_equals_its_adapter_model(runs: SimpleNamespace, cli) -> None:
    out = runs.root / "merged"
    result = cli("merge", runs.online, "--out", out)
    assert result.code == 0, result.err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    policy = load_policy(load_recipe(runs.online / "recipe.yaml"), runs.online)
    ids = AutoTokenizer.from_pretrained(out)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_push_rewrites_the_card_of_a_sampling_run_then_fails_cleanly_offline(runs: SimpleNamespace, cli) -> None:
    copy = shutil.copytree(runs.rlhf, runs.root / "push", ignore=shutil.ignore_patterns("checkpoint-*"))
    assert_clean_error(cli("push", copy, "--repo-id", "someone/tiny-rlhf"), "output.hub_model_id", "psipo push")
    _, body = _card(copy)
    assert 'from_pretrained("someone/tiny-rlhf")' in body and "eq. 6" in body


# ---------------------------------------------------------------------------------------------------------------
# Without training


def test_progress_line_of_a_sampling_step_shows_reward_kl_and_entropy() -> None:
    logs = {"loss": 2e-9, "reward": -0.0963, "kl_sequence": 0.578, "kl": 0.08, "entropy": 0.918}
    assert display.metrics_text(logs) == "loss 2e-09  reward -0.0963  KL 0.578  entropy 0.918"
    evaluation = {"eval_loss": 0.19, "eval_margin": 0.05, "eval_target": 0.33, "eval_reward": 0.02}
    assert display.metrics_text(evaluation) == "loss 0.19  h 0.05→0.33  reward 0.02"


def test_objective_labels_name_the_sampling_stages(tmp_path: Path) -> None:
    from psipo_cli.tools.run_metrics import Run

    def label(**sections: Any) -> str:
        sections.setdefault("rollout", {"reward_model": "r", "max_new_tokens": 8})
        recipe = Recipe.model_validate(tiny_recipe(tmp_path, **sections))
        return Run(tmp_path, "run", recipe, [], True).objective_label

    assert label(objective={"loss": "rlhf", "tau": 0.05}) == "RLHF τ=0.05"
    assert label(objective={"loss": "online_psipo", "tau": 0.5}) == "online IPO τ=0.5"
    assert label(objective={"loss": "online_psipo", "psi": "logit", "tau": 0.1}) == "online ΨPO (logit) τ=0.1"
    mixed = label(
        objective={"loss": "online_psipo", "tau": 0.5},
        rollout={"reward_model": "r", "max_new_tokens": 8, "mixture": 0.5},
    )
    assert mixed == "online IPO τ=0.5, mixture β=0.5"
