"""Safe by default: hub tokens never reach the run directory or the console, remote code is off unless asked
for (and the banner says when it is on), and paths are recorded absolute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from psipo_cli.recipe.loader import load_recipe

FAKE_TOKEN = "hf_psipoFakeToken0123456789abcdefXYZ"


@pytest.mark.slow
def test_hub_token_is_never_written_or_printed(cli, write_recipe, tmp_path: Path, monkeypatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"):
        monkeypatch.setenv(name, FAKE_TOKEN)
    result = cli("finetune", write_recipe(training={"max_steps": 2, "save_steps": 1}))

    assert result.code == 0, result.err
    assert FAKE_TOKEN not in result.out + result.err
    written = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert any(path.name == "README.md" for path in written)  # the model card is among the files checked
    assert any(path.parent.name.startswith("checkpoint-") for path in written)
    for path in written:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_remote_code_is_off_unless_the_recipe_says_so(write_recipe) -> None:
    assert load_recipe(write_recipe()).model.trust_remote_code is False
    assert load_recipe(write_recipe(model={"trust_remote_code": True})).model.trust_remote_code is True


@pytest.mark.slow
def test_banner_warns_when_remote_code_is_on(cli, write_recipe) -> None:
    result = cli("finetune", write_recipe(model={"trust_remote_code": True}, training={"max_steps": 1}))

    assert result.code == 0, result.err
    assert "trust_remote_code is ON" in result.out


def test_extends_and_data_paths_are_resolved_against_the_recipe(tmp_path: Path) -> None:
    nested = tmp_path / "recipes" / "team"
    nested.mkdir(parents=True)
    (tmp_path / "recipes" / "base.yaml").write_text(
        yaml.safe_dump({"data": {"train": "../data/pairs.jsonl"}}), encoding="utf-8"
    )
    (nested / "mine.yaml").write_text(
        yaml.safe_dump(
            {"extends": "../base.yaml", "model": {"name_or_path": "some/hub-model"}, "output": {"dir": "out"}}
        ),
        encoding="utf-8",
    )
    recipe = load_recipe(nested / "mine.yaml")

    assert recipe.data.train.path == str(tmp_path / "data" / "pairs.jsonl")  # relative to base.yaml, not cwd
    assert recipe.model.name_or_path == "some/hub-model"  # a hub id is left alone
    assert Path(recipe.output.dir).is_absolute()  # output.dir, like TRL's output_dir, is relative to the cwd
