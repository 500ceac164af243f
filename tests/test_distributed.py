"""Real 2-process runs on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, launched the way users launch them.

Each run uses 2 processes × 4 pairs per step and is compared with one process × 8 pairs (the same global
batch, the same data order): the logged losses must agree within 1e-4 (measured: ~5e-7, float summation order)
and the saved adapters within 1e-3 elementwise (see the test). `-m "not distributed"` skips these locally.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from psipo_cli.errors import UserError
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.run.directory import read_metrics
from psipo_cli.training.distributed import deepspeed_config, launch_command
from psipo_cli.training.finetune import run
from tests.conftest import REPO, TINY_MODEL, rollout_sections, tiny_recipe

STEPS = 4
CASES = {
    "ddp": [],
    "zero2": ["distributed.strategy=zero2"],
    "zero3": ["distributed.strategy=zero3"],
    "zero3-precomputed-reference": ["distributed.strategy=zero3", "objective.precompute_ref_log_probs=true"],
    "zero3-from-accelerate-config": ["--config", str(REPO / "recipes" / "accelerate" / "zero3.yaml")],
    # The conformance matrix's DeepSpeed cell: the engine's `config` is DeepSpeed's, the kernel must still be eager's.
    "zero2-eager-prefix-shared": [
        "distributed.strategy=zero2",
        "model.attn_implementation=eager",
        "training.prefix_sharing=true",
    ],
}


def _recipe(tmp: Path, name: str, batch: int) -> Path:
    path = tmp / f"{name}.yaml"
    training = {"max_steps": STEPS, "per_device_train_batch_size": batch, "logging_steps": 1}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / name, training=training)), encoding="utf-8")
    return path


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if m["split"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    run(load_recipe(_recipe(tmp, "single", batch=8)))
    return tmp / "single"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_two_processes_match_one_with_the_same_global_batch(case: str, single: Path, tmp_path: Path) -> None:
    extra = CASES[case]
    overrides = [x for x in extra if "=" in x]
    options = [x for x in extra if "=" not in x]
    command = [sys.executable, "-m", "psipo_cli", "launch", str(_recipe(tmp_path, case, batch=4)), "-n", "2"]
    done = subprocess.run([*command, *options, *overrides], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("psipo run finished") == 1, "only the main process reports"
    run_dir = tmp_path / case
    losses, reference = _losses(run_dir), _losses(single)
    assert len(losses) == STEPS
    layout = json.loads((run_dir / "summary.json").read_text())["layout"]
    assert layout["layout"] == "prefix-shared", layout  # checked inside the engine, on the first batch
    for got, want in zip(losses, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    # The saved adapter is whole (gathered under ZeRO-3), loads in one process, and equals the single-process one.
    # Tolerance: summation order differs between 1 and 2 processes (~1e-7 in the loss; more where one process runs
    # the lean rows and the other the dense row, e.g. a DeepSpeed engine), and Adam turns that into a step of up to
    # lr on an element whose gradient is near zero: bounded by lr = 5e-3, measured max |Δ| 1.2e-3.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), str(run_dir))
    ours = load_file(run_dir / "adapter_model.safetensors")
    theirs = load_file(single / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=5e-3, rtol=0)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("loss", "strategy"), [("rlhf", "zero2"), ("online_psipo", "zero3")])
def test_sampling_stages_run_under_deepspeed(loss: str, strategy: str, tmp_path: Path, reward_run: Path) -> None:
    """Two processes sample, score and train: each process's responses stay with their prompt (TRL's sampler),
    rewards are gathered across processes, and the saved adapter is whole. Samples differ from a one-process run
    (each process draws its own), so this checks the run and its logged quantities, not equality."""
    path = tmp_path / f"{loss}.yaml"
    sections = rollout_sections(reward_run, loss)
    sections["training"] = {**sections["training"], "max_steps": 3, "per_device_train_batch_size": 2}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / loss, **sections)), encoding="utf-8")
    command = [sys.executable, "-m", "psipo_cli", "launch", str(path), "-n", "2", f"distributed.strategy={strategy}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("psipo run finished") == 1, "only the main process reports"
    train = [m for m in read_metrics(tmp_path / loss) if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert train[0]["kl_sequence"] == pytest.approx(0.0, abs=1e-5) and train[-1]["kl_sequence"] != 0.0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), str(tmp_path / loss))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_train_on_batches_packed_by_tokens(tmp_path: Path) -> None:
    """Packed batches hold as many pairs as fit, so the two processes' batches differ in size: the per-pair metrics
    are gathered padded and cut back (a plain gather would stop at a size mismatch)."""
    path = tmp_path / "packed.yaml"
    training = {"max_steps": 6, "per_device_train_batch_size": 2, "pack_tokens": 96, "logging_steps": 1}
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "packed", training=training)), encoding="utf-8")
    command = [sys.executable, "-m", "psipo_cli", "launch", str(path), "-n", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train = [m for m in read_metrics(tmp_path / "packed") if m["split"] == "train"]
    assert [m["step"] for m in train] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) and 0 <= m["reward_accuracy"] <= 1 for m in train)
    layout = json.loads((tmp_path / "packed" / "summary.json").read_text())["layout"]
    assert layout["layout"] == "prefix-shared" and layout["pack_tokens"] == 96


def test_launch_dry_run_prints_the_accelerate_command(cli, write_recipe) -> None:
    result = cli("launch", write_recipe(), "-n", "4", "--port", "29999", "--dry-run", "objective.tau=2")
    assert result.code == 0, result.err
    line = result.out.strip()
    assert "-m accelerate.commands.launch --config_file" in line and "multi_gpu.yaml" in line
    assert "--num_processes 4 --mixed_precision no --main_process_port 29999 -m psipo_cli finetune" in line
    assert line.endswith("objective.tau=2")


def test_launch_validates_the_recipe_before_launching(cli, write_recipe) -> None:
    result = cli("launch", write_recipe(), "-n", "2", "--dry-run", "distributed.strategy=zero4")
    assert result.code == 2 and "distributed.strategy" in result.err


def test_recipe_zero_stage_builds_a_deepspeed_config(write_recipe) -> None:
    recipe = load_recipe(write_recipe(), ["distributed.strategy=zero3", "distributed.offload_params=true"])
    config = deepspeed_config(recipe.distributed)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert deepspeed_config(load_recipe(write_recipe()).distributed) is None  # auto: the launcher decides


def test_a_recipe_contradicting_the_launchers_zero_stage_is_refused(write_recipe, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    recipe = load_recipe(write_recipe(), ["distributed.strategy=zero3"])
    with pytest.raises(UserError, match="ZeRO-2"):
        deepspeed_config(recipe.distributed)
    assert deepspeed_config(load_recipe(write_recipe()).distributed) is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("distributed.offload_params=true", "offload_params needs strategy: zero3"),
        ("distributed.offload_optimizer=true", "offload_optimizer needs"),
    ],
)
def test_inconsistent_distributed_settings_are_recipe_errors(cli, write_recipe, override, fragment) -> None:
    result = cli("validate", write_recipe(), override)
    assert result.code == 2 and fragment in result.err


def test_launch_command_refuses_zero_processes(write_recipe) -> None:
    path = write_recipe()
    with pytest.raises(UserError, match="at least 1"):
        launch_command(path, load_recipe(path), [], 0)
