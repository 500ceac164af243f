"""Recipe loading: schema, extends, overrides, path resolution, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from psipo_cli.errors import UserError
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.recipe.schema import Recipe
from tests.conftest import RECIPES, assert_clean_error

SHIPPED = sorted(RECIPES.glob("**/*.yaml"))
SHIPPED = [p for p in SHIPPED if "accelerate" not in p.parts]  # accelerate configs are not recipes


def test_shipped_recipe_list_is_not_empty() -> None:
    names = {p.name for p in SHIPPED}
    assert {
        "tiny-ipo.yaml",
        "tiny-dpo.yaml",
        "tiny-psipo.yaml",
        "ipo-7b.yaml",
        "dpo-7b.yaml",
        "psipo-7b.yaml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_validates_and_opens_with_its_command(path: Path, cli) -> None:
    result = cli("validate", path)
    assert result.code == 0, result.err
    Recipe.model_validate(yaml.safe_load(result.out))  # the printed recipe is itself a valid recipe
    assert path.read_text(encoding="utf-8").startswith("# "), "each recipe opens with the command that runs it"
    assert "psipo" in path.read_text(encoding="utf-8").splitlines()[0]


def test_extends_merges_base_and_child_overrides_win(write_recipe, tmp_path: Path) -> None:
    base = write_recipe("base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nobjective:\n  loss: dpo\n", encoding="utf-8")
    recipe = load_recipe(child)
    assert recipe.objective.loss == "dpo"
    assert recipe.objective.tau == 0.5  # from the base
    assert recipe.model.name_or_path == load_recipe(base).model.name_or_path


def test_base_recipe_paths_stay_relative_to_the_base(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "model: {name_or_path: ./m}\ndata: {train: data/x.jsonl}\noutput: {dir: out}\n", encoding="utf-8"
    )
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\n", encoding="utf-8")
    recipe = load_recipe(tmp_path / "sub" / "child.yaml")
    assert recipe.data.train.path == str(tmp_path / "data" / "x.jsonl")
    assert recipe.model.name_or_path == str(tmp_path / "m")


def test_hub_ids_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {name_or_path: org/model}\ndata: {train: {path: org/data, split: train_prefs}}\noutput: {dir: o}\n",
        encoding="utf-8",
    )
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == "org/model"
    assert (recipe.data.train.path, recipe.data.train.split) == ("org/data", "train_prefs")


def test_overrides_are_typed_by_the_schema(write_recipe) -> None:
    recipe = load_recipe(
        write_recipe(),
        [
            "objective.tau=0.25",
            "training.max_steps=7",
            "training.bf16=false",
            "adapter.target_modules=[q_proj,v_proj]",
        ],
    )
    assert recipe.objective.tau == 0.25
    assert recipe.training.max_steps == 7
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]


def test_default_aggregation_follows_the_loss(write_recipe) -> None:
    assert load_recipe(write_recipe(), ["objective.loss=dpo"]).objective.logps == "sum"
    assert load_recipe(write_recipe(), ["objective.loss=ipo"]).objective.logps == "mean"
    assert load_recipe(write_recipe(), ["objective.loss=ipo", "objective.logps=sum"]).objective.logps == "sum"


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("objective.tua=1", ["objective.tua", "did you mean 'objective.tau'"]),
        ("model.nme=x", ["model.nme", "did you mean 'model.name_or_path'"]),
        ("data.columns.lable=x", ["did you mean 'data.columns.label'"]),
        ("objective.tau=-1", ["objective.tau", "greater than 0"]),
        ("objective.tau=abc", ["objective.tau", "valid number"]),
        ("objective.loss=kto", ["objective.loss"]),
        ("objective.psi=cube", ["objective.psi", "unknown Ψ"]),
        ("training.learning_rate=0", ["training.learning_rate"]),
        ("training.per_device_train_batch_size=0", ["training.per_device_train_batch_size"]),
        ("training.max_steps=1.5", ["training.max_steps", "integer"]),
        ("objective.tau.x=1", ["'objective.tau' has no sub-keys"]),
        ("no_equals_sign", ["key.path=value"]),
        ("objective.tau=[1", ["objective.tau", "cannot parse"]),
        ("adapter.target_modules=[lm_head]", ["adapter.target_modules", "lm_head"]),
        ("objective.loss=psipo objective.psi=logit", ["objective.psi", "probability estimates"]),
        ("data.columns.label=p_chosen", ["ipo uses hard labels"]),
    ],
)
def test_bad_recipe_values_fail_with_one_line_naming_the_key(write_recipe, cli, override, fragments) -> None:
    assert_clean_error(cli("validate", write_recipe(), *override.split()), *fragments)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model:\n  name_or_path: a\n  name_or_path: b\n", "duplicate key 'name_or_path'"),
        ("model:\n\tname_or_path: a\n", "invalid YAML: line 2"),
        ("model: [unclosed\n", "invalid YAML"),
        ("", "recipe is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
        (
            "modle: {}\nmodel: {name_or_path: x}\ndata: {train: x.jsonl}\noutput: {dir: o}\n",
            "did you mean 'model'",
        ),
        ("extends: missing.yaml\n", "base recipe 'missing.yaml' not found"),
        ("extends: 3\n", "extends must be a path"),
        ("extends: r.yaml\n", "extends cycle"),
        ("model: {name_or_path: x}\noutput: {dir: o}\n", "data: required key is missing"),
    ],
)
def test_broken_recipe_files_fail_cleanly(tmp_path: Path, cli, text: str, fragment: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    assert_clean_error(cli("validate", path), fragment)


def test_missing_recipe_file_is_a_clean_error(cli, tmp_path: Path) -> None:
    assert_clean_error(cli("validate", tmp_path / "nope.yaml"), "recipe file not found")


def test_load_recipe_raises_user_error_not_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: x.jsonl}\noutput: {dir: o}\nobjective: {tau: 0}\n")
    with pytest.raises(UserError, match=r"objective\.tau"):
        load_recipe(path)


def test_recipes_command_lists_every_shipped_recipe_with_a_description(cli) -> None:
    result = cli("recipes")
    assert result.code == 0
    for path in RECIPES.glob("*.yaml"):
        line = next(line for line in result.out.splitlines() if path.name in line)
        assert len(line.split(path.name, 1)[1].strip()) > 10, line


def test_readme_key_table_matches_the_schema() -> None:
    import sys

    sys.path.insert(0, str(RECIPES.parent / "scripts"))
    import gen_docs

    readme = (RECIPES.parent / "README.md").read_text(encoding="utf-8")
    assert gen_docs.render(readme) == readme, "README's recipe key table is stale: run `make docs`"


def test_adapter_dropout_defaults_by_stage(write_recipe, tmp_path: Path) -> None:
    """0.05 for the preference stages; 0 for the sampling stages, which score with the policy that sampled."""
    raw = yaml.safe_load(write_recipe().read_text())
    del raw["adapter"]["dropout"]
    (tmp_path / "pref.yaml").write_text(yaml.safe_dump(raw))
    assert load_recipe(tmp_path / "pref.yaml").adapter.dropout == 0.05
    raw["objective"] = {"loss": "rlhf"}
    raw["rollout"] = {"reward_model": str(tmp_path), "max_new_tokens": 8}
    (tmp_path / "rlhf.yaml").write_text(yaml.safe_dump(raw))
    assert load_recipe(tmp_path / "rlhf.yaml").adapter.dropout == 0.0
