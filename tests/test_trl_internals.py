"""The private TRL/transformers hooks psipo relies on: all present on the installed versions, and a missing one
stops `psipo finetune` at start with one line naming it."""

from __future__ import annotations

import sys

import pytest
from trl.trainer.dpo_trainer import DPOTrainer

from psipo_cli.errors import UserError
from psipo_cli.training import trl_internals
from tests.conftest import assert_clean_error


@pytest.mark.parametrize("hook", trl_internals.HOOKS, ids=lambda hook: f"{hook.where}:{hook.name}")
def test_every_hook_holds_on_the_installed_versions(hook: trl_internals.Hook) -> None:
    assert trl_internals.missing(hook) is None
    assert hook.used_by and hook.used_for and hook.why_private


def test_a_missing_hook_is_named_with_the_versions(monkeypatch) -> None:
    monkeypatch.delattr(DPOTrainer, "_prepare_dataset")
    monkeypatch.setattr(trl_internals, "_verified", False)

    with pytest.raises(UserError) as caught:
        trl_internals.check()

    message = str(caught.value)
    assert "trl.trainer.dpo_trainer.DPOTrainer._prepare_dataset not found" in message
    assert "installed trl " in message and "transformers " in message and "tested: trl 1.16" in message
    assert "\n" not in message


def test_a_changed_contract_is_caught(monkeypatch) -> None:
    """Not only missing names: _prepare_dataset reading more than `_tokenizer` from self breaks `psipo eval`."""

    def reads_more(self, dataset, processing_class, args, dataset_name):
        return self._tokenizer, self.args

    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", reads_more)

    problems = trl_internals.problems()

    assert problems == [
        "trl.trainer.dpo_trainer.DPOTrainer._prepare_dataset reads ['_tokenizer', 'args'] from self, not ['_tokenizer']"
    ]


def test_finetune_stops_at_start_with_one_line(cli, write_recipe, tmp_path, monkeypatch) -> None:
    # The check runs when the training package is first imported: forget it, so `finetune` imports it afresh
    # (monkeypatch puts the modules back afterwards).
    for name in [
        name for name in sys.modules if name == "psipo_cli.training" or name.startswith("psipo_cli.training.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(DPOTrainer, "_prepare_dataset")

    result = cli("finetune", write_recipe())

    assert_clean_error(result, "DPOTrainer._prepare_dataset not found", "installed trl 1.16")
    assert not (tmp_path / "run").exists()


def test_help_does_not_import_the_training_package(cli, monkeypatch) -> None:
    for name in [
        name for name in sys.modules if name == "psipo_cli.training" or name.startswith("psipo_cli.training.")
    ]:
        monkeypatch.delitem(sys.modules, name)

    result = cli("--help")

    assert result.code == 0
    assert "psipo_cli.training" not in sys.modules
