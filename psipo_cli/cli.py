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
stdout = Console(highlight=False, soft_wrap=True)

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


@app.command(context_settings={"allow_extra_args": False})
def launch(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    num_processes: Annotated[int, typer.Option("--num-processes", "-n", help="Processes (GPUs) to launch.")] = 1,
    config: Annotated[Path | None, typer.Option(help="accelerate config; default: by distributed.strategy.")] = None,
    port: Annotated[int | None, typer.Option(help="Rendezvous port; default: a free one.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the accelerate command and exit.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output.dir.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in output.dir.")] = False,
) -> None:
    """Run `accelerate launch ... -m psipo_cli finetune RECIPE` with a shipped accelerate config."""
    import shlex
    import subprocess

    from psipo_cli.distributed import launch_command
    from psipo_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)  # fail here, once, rather than in every process
    flags = [flag for flag, on in (("--overwrite", overwrite), ("--resume", resume)) if on]
    command = launch_command(recipe, loaded, overrides or [], num_processes, config, port, flags)
    stdout.print(shlex.join(command), markup=False)
    if not dry_run:
        raise typer.Exit(subprocess.run(command, check=False).returncode)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe and print it fully resolved (defaults filled in, paths absolute)."""
    from psipo_cli.recipe import dump_recipe, load_recipe

    stdout.print(dump_recipe(load_recipe(recipe, overrides)), end="", markup=False)


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes with what each is for."""
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        description = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description", "")
        stdout.print(f"{path.relative_to(RECIPES_DIR.parent)}  [dim]{description}[/dim]")


@app.command()
def label(
    run: Annotated[Path, typer.Argument(help="Reward-model run directory, or its recipe.", show_default=False)],
    data: Annotated[str, typer.Argument(help="Pairs to label: a local file or hub dataset id.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Labelled copy to write (.jsonl).", show_default=False)],
    column: Annotated[str, typer.Option(help="Name of the soft-label column to add.")] = "p_hat",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Write DATA back with p̂ = σ(r(chosen) − r(rejected)) from a trained reward model."""
    from psipo_cli.label import label_file

    report = label_file(run, data, out, column, overwrite)
    stdout.print(
        f"{report.rows} pairs labelled, mean p̂ {report.mean_p_hat:.3f}; the reward model agrees with the "
        f"chosen/rejected order on {report.agreement:.1%} of them; wrote {report.out}"
    )


@app.command()
def bandit(
    actions: Annotated[str, typer.Option(help="Action names, e.g. a,b,c.", show_default=False)],
    pairs: Annotated[str, typer.Option(help="Preferences 'a>b,b>c:0.8': winner>loser[:p̂]; may repeat.")],
    loss: Annotated[list[str], typer.Option(help="ipo, dpo or psipo; repeat for several.")] = ("ipo", "dpo"),
    tau: Annotated[list[float], typer.Option(help="Regularisation τ > 0; repeat for several.")] = (0.1, 0.5, 1.0),
    psi: Annotated[str, typer.Option(help="Ψ of --loss psipo: identity or logit.")] = "identity",
    steps: Annotated[int, typer.Option(help="Adam steps.")] = 18_000,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 0.01,
    batch: Annotated[int, typer.Option(help="Pairs per step, drawn with replacement.")] = 9,
    seeds: Annotated[int, typer.Option(help="Independent runs per (loss, τ).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the first run's random stream.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of the table.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write learning curves to this .png.", show_default=False)] = None,
) -> None:
    """Train the paper's tabular bandit examples and compare with the closed-form optimum."""
    from psipo_cli.bandit_report import check_plot_path, print_table, run_bandit, save_plot, to_json

    if plot is not None:
        check_plot_path(plot)
    report = run_bandit(actions, pairs, loss, tau, psi, steps, lr, batch, seeds, seed)
    if plot is not None:
        save_plot(report, plot)
    if as_json:
        typer.echo(to_json(report))
        return
    print_table(report, stdout)
    if plot is not None:
        stdout.print(f"plot: {plot}", markup=False)


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
