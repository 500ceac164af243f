"""What the trainer adds to the loss and what it leaves random: the MoE balancing loss, LoRA's own dropout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from psipo_cli.recipe.loader import load_recipe
from psipo_cli.training.finetune import build_trainer, prepare
from tests.conftest import TINY_MODEL


def _tiny_mixtral(directory: Path) -> Path:
    shutil.copytree(TINY_MODEL, directory, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    config = MixtralConfig(
        vocab_size=768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_the_moe_balancing_loss_is_added_to_the_policy_loss(write_recipe, tmp_path: Path) -> None:
    model_dir = _tiny_mixtral(tmp_path / "mixtral")
    trainer = build_trainer(prepare(load_recipe(write_recipe(), [f"model.name_or_path={model_dir}"])))
    assert trainer.aux_loss_enabled  # TRL's own switch: an MoE config with a balancing coefficient
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    trainer.model.train()
    with torch.no_grad():
        with_aux = trainer.compute_loss(trainer.model, inputs)
        aux = trainer.forward_step(trainer.model, inputs, router_aux=True).router_aux_loss
        trainer.aux_loss_enabled = False
        without = trainer.compute_loss(trainer.model, inputs)
    coef = trainer.model.config.router_aux_loss_coef
    assert aux is not None and aux > 0
    torch.testing.assert_close(with_aux - without, aux, atol=1e-6, rtol=1e-5)
    assert aux / coef == pytest.approx(2.0, rel=0.5)  # Mixtral's balancing loss is ~top-k at a random init
    assert trainer.forward_step.verdict.layout == "concatenated"  # the 4-D shared mask cannot feed it
    assert "router balancing loss" in trainer.forward_step.verdict.reason


def test_adapter_dropout_is_honoured_and_every_other_dropout_is_off(write_recipe) -> None:
    trainer = build_trainer(prepare(load_recipe(write_recipe(), ["adapter.dropout=0.5"])))
    dropouts = {n: m.p for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    lora = {n: p for n, p in dropouts.items() if ".lora_dropout." in n}
    assert lora and set(lora.values()) == {0.5}
    assert all(p == 0.0 for n, p in dropouts.items() if n not in lora)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a trained adapter: dropout on its input now changes the output
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    with torch.no_grad():
        first, second = (trainer.forward_step(trainer.model, inputs).chosen for _ in range(2))
        with trainer._reference_context():  # the reference is the base: no adapter, no dropout
            ref = [trainer.forward_step(trainer.model, inputs).chosen for _ in range(2)]
    assert not torch.allclose(first, second)
    assert torch.equal(ref[0], ref[1])


def test_a_reward_model_keeps_its_adapter_dropout_too(write_recipe) -> None:
    trainer = build_trainer(prepare(load_recipe(write_recipe(), ["adapter.dropout=0.3", "objective.loss=reward"])))
    dropouts = {n: m.p for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for n, p in dropouts.items() if ".lora_dropout." in n} == {0.3}
    assert all(p == 0.0 for n, p in dropouts.items() if ".lora_dropout." not in n)
