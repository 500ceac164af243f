"""What a training stage starts from: the recipe, the tokenizer and the checked pairs, nothing written yet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psipo_cli.data.pairs import PreferenceData
from psipo_cli.recipe.schema import Recipe


@dataclass
class Prepared:
    """Everything validated and loaded, nothing written yet."""

    recipe: Recipe
    tokenizer: Any
    train: PreferenceData
    eval: PreferenceData | None
