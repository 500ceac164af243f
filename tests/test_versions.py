"""The tested versions ship inside the package, the run banner says when TRL or transformers differ from them, and
`psipo --help` tells a user what psipo does."""

from __future__ import annotations

from types import SimpleNamespace

from psipo_cli import versions
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.run.display import banner_lines


def test_constraints_pin_the_tested_libraries_but_not_torch() -> None:
    tested = versions.tested_versions()

    assert {"trl", "transformers", "peft", "accelerate", "datasets"} <= set(tested)
    assert not [name for name in tested if name in ("torch", "triton", "psipo") or name.startswith("nvidia-")]


def _banner(write_recipe) -> list[str]:
    recipe = load_recipe(write_recipe())
    trainer = SimpleNamespace(model=SimpleNamespace(get_nb_trainable_parameters=lambda: (10, 100)))
    prepared = SimpleNamespace(
        recipe=recipe, train=SimpleNamespace(dataset=[{}] * 3, dropped={}, truncated=0), eval=None
    )
    return banner_lines(trainer, prepared)


def test_banner_names_versions_that_differ_from_the_tested_ones(write_recipe, monkeypatch) -> None:
    tested = versions.tested_versions()
    installed = {"trl": "1.17.0", "transformers": tested["transformers"]}
    monkeypatch.setattr(versions, "installed_version", lambda name: installed.get(name))

    lines = [line for line in _banner(write_recipe) if line.startswith("versions ")]

    assert lines == [
        f"versions   trl 1.17.0 (tested {tested['trl']}): not the versions psipo was tested with "
        f"(pinned in {versions.constraints_path()})"
    ]


def test_banner_is_silent_on_the_tested_versions(write_recipe, monkeypatch) -> None:
    tested = versions.tested_versions()
    monkeypatch.setattr(versions, "installed_version", lambda name: tested.get(name))

    assert not [line for line in _banner(write_recipe) if line.startswith("versions ")]


def test_help_says_what_psipo_does(cli) -> None:
    result = cli("--help")

    assert result.code == 0, result.err
    text = " ".join(result.out.replace("│", " ").split())
    assert "Fine-tune a language model on preference pairs" in text
    assert "DPO, IPO or the general ΨPO objective" in text
    assert "psipo finetune RECIPE" in text
    assert "thin typer commands" not in text  # the developer note is a comment, not help
