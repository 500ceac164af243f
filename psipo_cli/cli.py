"""The `psipo` command line: thin typer commands over recipe loading and `finetune.run`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from psipo_cli.errors import EXIT_USER_ERROR, UserError

# bitsandbytes tries to fetch an optional CPU kernel from the hub on import and warns when it can't; it falls back
# to its built-in kernel, so the warning is noise (and the fetch can never work offline).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides such as objective.tau=0.5 training.max_steps=100.")
]


@app.command()
def finetune(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output.dir.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in output.dir from its newest checkpoint.")] = False,
) -> None:
    """Fine-tune the recipe's model on its preference data."""
    from psipo_cli.finetune import run
    from psipo_cli.recipe import load_recipe
    from psipo_cli.report import print_banner, print_summary

    if overwrite and resume:
        raise UserError("--overwrite and --resume are exclusive")
    loaded = load_recipe(recipe, overrides)
    summary = run(loaded, overwrite=overwrite, resume=resume, on_start=print_banner)
    print_summary(summary)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe and print it fully resolved (defaults filled in, paths absolute)."""
    from psipo_cli.recipe import dump_recipe, load_recipe

    out.print(dump_recipe(load_recipe(recipe, overrides)), end="", markup=False)


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes with what each is for."""
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        description = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description", "")
        out.print(f"{path.relative_to(RECIPES_DIR.parent)}  [dim]{description}[/dim]")


def main() -> None:
    """Entry point: user errors become one line and exit code 2; `PSIPO_DEBUG=1` shows the traceback.

    Usage errors (unknown option, missing argument) are click's own, also exit code 2.
    """
    try:
        app()
    except UserError as err:
        if os.environ.get("PSIPO_DEBUG"):
            raise
        err_console.print(f"error: {err}", markup=False)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
