"""End to end on the shipped tiny model: each objective trains, the run directory is complete, the saved
adapter reproduces what was logged, and the reference really is the adapter-free (or starting) model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.run.directory import read_metrics
from psipo_cli.training.finetune import build_trainer, prepare, run
from tests.conftest import RECIPES, TINY_DATA, TINY_MODEL, tiny_recipe

pytestmark = pytest.mark.slow

TAU = 1.0
TARGET = 1 / (2 * TAU)  # IPO's margin target, in token-mean log-prob units (objective.logps: mean)
# 64 training pairs seen 20 times: IPO is a per-pair regression, so on pairs it has fitted the mean margin
# sits at its target; DPO's logistic loss keeps pushing every margin up.
LONG_RUN = {
    "objective": {"tau": TAU, "logps": "mean"},
    "training": {
        "max_steps": 80,
        "per_device_train_batch_size": 16,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "linear",
        "logging_steps": 10,
        "eval_steps": 40,
    },
}


def _write(tmp: Path, name: str, **sections) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / name, **sections)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 64 training pairs (both row formats occur among them)."""
    path = tmp_path_factory.mktemp("data") / "train64.jsonl"
    lines = (TINY_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _long_run(tmp: Path, subset: Path, loss: str) -> tuple[dict, Path]:
    data = {"data": {"train": str(subset), "eval": str(subset)}}
    recipe = load_recipe(_write(tmp, loss, **LONG_RUN, **data), [f"objective.loss={loss}"])
    return run(recipe), Path(recipe.output.dir)


@pytest.fixture(scope="module")
def ipo_run(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> tuple[dict, Path]:
    return _long_run(tmp_path_factory.mktemp("ipo"), subset, "ipo")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> tuple[dict, Path]:
    return _long_run(tmp_path_factory.mktemp("dpo"), subset, "dpo")


def _eval_margins(run_dir: Path) -> list[float]:
    return [m["margin"] for m in read_metrics(run_dir) if m["split"] == "eval"]


def test_ipo_margin_settles_at_its_target(ipo_run) -> None:
    summary, run_dir = ipo_run
    assert summary["final_eval"]["target"] == pytest.approx(TARGET)
    assert summary["final_eval"]["margin"] == pytest.approx(TARGET, abs=0.1)
    mid, end = _eval_margins(run_dir)[:2]
    assert abs(end - mid) < 0.1, "IPO's margin has settled: it no longer moves much"


def test_dpo_margin_keeps_growing_past_the_ipo_target(dpo_run) -> None:
    summary, run_dir = dpo_run
    mid, end = _eval_margins(run_dir)[:2]
    assert end > 2 * TARGET
    assert end > mid + 0.1, "DPO's margin is still growing at the end of the run"
    assert summary["final_eval"]["reward_accuracy"] > 0.8


def test_run_directory_holds_recipe_metrics_adapter_and_summary(ipo_run) -> None:
    _, run_dir = ipo_run
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "adapter_model.safetensors", "adapter_config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "tokenizer_config.json").is_file()
    assert not (run_dir / "ref").exists(), "only the trained adapter is saved"
    assert load_recipe(run_dir / "recipe.yaml").objective.loss == "ipo"  # the resolved recipe reloads
    train_logs = [m for m in read_metrics(run_dir) if m["split"] == "train"]
    assert [m["step"] for m in train_logs] == [10, 20, 30, 40, 50, 60, 70, 80]
    for key in ("loss", "margin", "target", "reward_accuracy", "logps_chosen", "logps_rejected", "learning_rate"):
        assert all(key in m for m in train_logs), key
    assert all(m["tokens_per_s"] > 0 for m in train_logs)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == 80 and on_disk["runtime_s"] > 0
    assert {"torch", "transformers", "trl", "peft"} <= on_disk["versions"].keys()
    assert "adapter disabled" in on_disk["reference"]


def _reload(run_dir: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run_dir))


def test_saved_adapter_reproduces_the_logged_log_probs(ipo_run, tmp_path: Path) -> None:
    summary, run_dir = ipo_run
    recipe = load_recipe(run_dir / "recipe.yaml", [f"output.dir={tmp_path / 'again'}"])
    trainer = build_trainer(prepare(recipe), model=_reload(run_dir))
    again = trainer.evaluate()
    for key in ("logps_chosen", "logps_rejected"):
        assert again[f"eval_{key}"] == pytest.approx(summary["final_eval"][key], abs=1e-5), key


def _batch_and_trainer(run_dir: Path, tmp_path: Path, model: PeftModel):
    """A concatenated-layout batch (input_ids + completion_mask, checkable by a plain forward)."""
    overrides = [f"output.dir={tmp_path / 'x'}", "training.prefix_sharing=false"]
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    trainer = build_trainer(prepare(recipe), model=model)
    batch = next(iter(trainer.get_eval_dataloader()))
    return trainer, batch


def test_forward_step_matches_a_plain_transformers_forward(ipo_run, tmp_path: Path) -> None:
    """The fused, chunked log-prob path gives what log_softmax over full logits gives."""
    _, run_dir = ipo_run
    model = _reload(run_dir).eval()
    trainer, batch = _batch_and_trainer(run_dir, tmp_path, model)
    with torch.no_grad():
        fused = trainer.forward_step(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    sums = (token_logps * batch["completion_mask"][:, 1:]).sum(1)  # (2B,)
    torch.testing.assert_close(torch.cat([fused.chosen, fused.rejected]), sums, atol=1e-4, rtol=1e-5)


def test_disabled_adapter_gives_the_base_model_log_probs(ipo_run, tmp_path: Path) -> None:
    _, run_dir = ipo_run
    model = _reload(run_dir).eval()
    trainer, batch = _batch_and_trainer(run_dir, tmp_path, model)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        with model.disable_adapter():
            disabled = trainer.forward_step(model, batch)
        trained = trainer.forward_step(model, batch)
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    base_sums = (token_logps * batch["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(torch.cat([disabled.chosen, disabled.rejected]), base_sums, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(trained.chosen, disabled.chosen, atol=1e-2), "the trained adapter changed the policy"


def _short_run(tmp: Path, name: str, overrides: list[str], **sections) -> tuple[dict, list[dict]]:
    recipe = load_recipe(_write(tmp, name, **sections), overrides)
    summary = run(recipe)
    return summary, [m for m in read_metrics(Path(recipe.output.dir)) if m["split"] == "train"]


def test_psipo_with_identity_psi_and_hard_labels_equals_ipo(tmp_path: Path) -> None:
    _, ipo = _short_run(tmp_path, "ipo", ["objective.loss=ipo", "training.max_steps=3"])
    _, psipo = _short_run(tmp_path, "psipo", ["objective.loss=psipo", "training.max_steps=3"])
    for a, b in zip(ipo, psipo, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
        assert a["margin"] == pytest.approx(b["margin"], abs=1e-7)


def test_psipo_regresses_to_the_soft_label_target(tmp_path: Path, subset: Path) -> None:
    overrides = ["objective.loss=psipo", "objective.tau=0.25", "data.columns.label=p_chosen", "training.max_steps=1"]
    _, logs = _short_run(
        tmp_path, "soft", overrides, data={"train": str(subset)}, training={"per_device_train_batch_size": 64}
    )
    labels = [json.loads(line)["p_chosen"] for line in subset.read_text().splitlines()]
    assert len(set(labels)) > 1, "the subset has genuinely soft labels"
    # The whole training set in one batch: the logged target is the mean of (p̂ − ½)/τ over all pairs.
    expected = sum((p - 0.5) / 0.25 for p in labels) / len(labels)
    assert logs[0]["target"] == pytest.approx(expected, rel=1e-5)


def test_precomputed_reference_gives_the_same_run(tmp_path: Path) -> None:
    _, per_step = _short_run(tmp_path, "live", ["training.max_steps=3"])
    _, precomputed = _short_run(tmp_path, "pre", ["training.max_steps=3", "objective.precompute_ref_log_probs=true"])
    for a, b in zip(per_step, precomputed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["margin"] == pytest.approx(b["margin"], abs=1e-5)


def test_starting_adapter_is_the_reference_not_the_bare_base(ipo_run, tmp_path: Path) -> None:
    _, sft_dir = ipo_run  # stands in for an SFT adapter
    summary, logs = _short_run(
        tmp_path, "cont", [f"adapter.init_from={sft_dir}", "training.max_steps=1", "training.learning_rate=1e-9"]
    )
    assert "starting adapter" in summary["reference"]
    # Policy and reference are the same adapter at step 1: no drift. Against the bare base it would be large.
    assert abs(logs[0]["logratio_chosen"]) < 1e-4
    assert abs(logs[0]["margin"]) < 1e-4
    assert not (Path(summary["run_dir"]) / "ref").exists()


def test_qlora_4bit_trains_on_cpu(tmp_path: Path, subset: Path) -> None:
    summary, logs = _short_run(
        tmp_path,
        "qlora",
        ["model.quantization=4bit", "objective.loss=dpo"],
        data={"train": str(subset)},
        training={"per_device_train_batch_size": 16, "max_steps": 24, "logging_steps": 8},
    )
    assert summary["versions"].get("bitsandbytes")
    losses = [m["loss"] for m in logs]
    assert losses[-1] < losses[0] - 0.05, losses  # log 2 ≈ 0.693 at the start


def test_qlora_demo_recipe_runs_to_the_end_with_evaluations(cli, tmp_path: Path) -> None:
    """A newcomer's first QLoRA try: the demo recipe (96-wide tiny model, held-out split) quantised to 4 bits on CPU.
    Its evaluations run the 4-bit layers in eval mode, where bitsandbytes' CPU kernel cannot take 96 inputs."""
    out = tmp_path / "run"
    overrides = ["model.quantization=4bit", f"output.dir={out}", "training.max_steps=2", "training.eval_steps=1"]
    result = cli("finetune", RECIPES / "tiny-ipo.yaml", *overrides, "training.logging_steps=1", "--quiet")
    assert result.code == 0, result.err[-2000:]
    evals = [m for m in read_metrics(out) if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [1, 2]
    assert all(m["loss"] > 0 and "margin" in m for m in evals), evals
