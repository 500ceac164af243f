# The `psipo` command line: thin typer commands over recipe loading and `finetune.run`. Each command imports what it
# needs inside its body, so `psipo --help` and `psipo validate` never import torch, TRL or the training package.

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal

import typer
import yaml
from rich.console import Console

from psipo_cli.errors import DISK_ERRNOS, EXIT_USER_ERROR, EXIT_WRITE_FAILED, RunStopped, UserError

# bitsandbytes tries to fetch an optional CPU kernel from the hub on import and warns when it can't; it falls back
# to its built-in kernel, so the warning is noise (and the fetch can never work offline).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# What `psipo --help` opens with. One string per paragraph: the help keeps line breaks inside later paragraphs.
HELP = "\n\n".join(
    (
        "Fine-tune a language model on preference pairs (a prompt, a chosen and a rejected response) with DPO, IPO "
        "or the general ΨPO objective, training a LoRA or QLoRA adapter. Or train a reward model on the pairs and a "
        "policy against it: RLHF (objective.loss: rlhf) or online IPO/ΨPO on pairs the policy samples "
        "(objective.loss: online_psipo).",
        "Start with `psipo recipes` (the shipped recipes), check one with `psipo validate RECIPE` and train with "
        "`psipo finetune RECIPE` (several GPUs: `psipo launch`). Then score the run with `psipo eval RUN`, try it "
        "with `psipo generate` or `psipo chat`, and export it with `psipo merge` or `psipo push`.",
    )
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_enable=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides such as objective.tau=0.5 training.max_steps=100.")
]


ResumeFlag = Annotated[
    bool, typer.Option(help="Continue output.dir's run from its newest complete checkpoint; --resume PATH: from PATH.")
]
ResumeFrom = Annotated[Path | None, typer.Option(hidden=True, help="Set by `--resume PATH`.")]
ForceResume = Annotated[
    bool,
    typer.Option(help="With --resume: continue even if the recipe, data or model changed since the checkpoint."),
]


@app.command()
def finetune(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output.dir.")] = False,
    resume: ResumeFlag = False,
    resume_from: ResumeFrom = None,
    force_resume: ForceResume = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only errors and where the run was saved.")
    ] = False,
    plain: Annotated[
        bool, typer.Option(help="One line per log step (the default when stdout is not a terminal).")
    ] = False,
) -> None:
    """Fine-tune the recipe's model on its preference data (rlhf, online_psipo: on responses it samples)."""
    from psipo_cli.recipe.loader import load_recipe
    from psipo_cli.run.display import Display, pick_mode
    from psipo_cli.training.finetune import run

    resume_arg: bool | Path = resume_from or resume
    if overwrite and resume_arg:
        raise UserError("--overwrite and --resume are exclusive")
    if force_resume and not resume_arg:
        raise UserError("only continues a run: pass it with --resume", where="--force-resume")
    loaded = load_recipe(recipe, overrides)
    display = Display(pick_mode(quiet, plain))
    summary = run(loaded, overwrite=overwrite, resume=resume_arg, display=display, force_resume=force_resume)
    display.summary(summary)


@app.command(context_settings={"allow_extra_args": False})
def launch(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    num_processes: Annotated[int, typer.Option("--num-processes", "-n", help="Processes (GPUs) to launch.")] = 1,
    config: Annotated[Path | None, typer.Option(help="accelerate config; default: by distributed.strategy.")] = None,
    port: Annotated[int | None, typer.Option(help="Rendezvous port; default: a free one.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the accelerate command and exit.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output.dir.")] = False,
    resume: ResumeFlag = False,
    resume_from: ResumeFrom = None,
    force_resume: ForceResume = False,
) -> None:
    """Run `accelerate launch ... -m psipo_cli finetune RECIPE` with a shipped accelerate config."""
    import shlex
    import subprocess

    from psipo_cli.recipe.loader import load_recipe
    from psipo_cli.training.distributed import launch_command

    loaded = load_recipe(recipe, overrides)  # fail here, once, rather than in every process
    switches = (("--overwrite", overwrite), ("--resume", resume), ("--force-resume", force_resume))
    flags = [flag for flag, on in switches if on]
    flags += ["--resume-from", str(resume_from)] if resume_from else []
    command = launch_command(recipe, loaded, overrides or [], num_processes, config, port, flags)
    stdout.print(shlex.join(command), markup=False)
    if not dry_run:
        raise typer.Exit(subprocess.run(command, check=False).returncode)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe and print it fully resolved (defaults filled in, paths absolute)."""
    from psipo_cli.recipe.loader import dump_recipe, load_recipe

    stdout.print(dump_recipe(load_recipe(recipe, overrides)), end="", markup=False)


RunArg = Annotated[
    Path, typer.Argument(help="Run directory, or the recipe whose output.dir it is.", show_default=False)
]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Most tokens to generate per reply.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 decodes greedily.")]
Seed = Annotated[int | None, typer.Option(help="Seed the sampling, for a reproducible output.", show_default=False)]
Reference = Annotated[bool, typer.Option(help="Use the reference policy (the adapter disabled) instead.")]
Raw = Annotated[bool, typer.Option(help="Give prompts as plain text, without the tokenizer's chat template.")]


@app.command()
def merge(
    run: RunArg,
    out: Annotated[Path, typer.Option(help="Directory for the merged model.", show_default=False)],
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in --out.")] = False,
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"] | None,
        typer.Option(help="Dtype of the merged weights; default: the recipe's (float32 for QLoRA on CPU)."),
    ] = None,
) -> None:
    """Merge the run's adapter into its base model: a plain transformers model (safetensors) + tokenizer."""
    from psipo_cli.tools.merge import merge_run

    report = merge_run(run, out, overwrite, dtype)
    note = f"; the {report.dequantised} base was loaded unquantised" if report.dequantised else ""
    stdout.print(
        f"merged {report.parameters:,} parameters ({report.dtype}{note}) into {report.out}; "
        f"load with {report.auto_class}.from_pretrained('{report.out}')",
        markup=False,
    )


@app.command()
def generate(
    run: RunArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")],
    max_new_tokens: MaxNewTokens = 64,
    temperature: Temperature = 0.7,
    seed: Seed = None,
    reference: Reference = False,
    raw: Raw = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together (left-padded).")] = 16,
) -> None:
    """Print a completion of each prompt by the run's trained policy."""
    from psipo_cli.tools.generate import Sampling, generate_completions, open_generator

    sampling = Sampling(max_new_tokens, temperature, seed)
    generator = open_generator(run, sampling, reference, raw)
    err_console.print(generator.describe(), markup=False)
    completions = generate_completions(generator, prompt, sampling, batch_size)
    for text, completion in zip(prompt, completions, strict=True):
        stdout.print(f"> {text}\n{completion}\n", markup=False)


@app.command()
def chat(
    run: RunArg,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.7,
    seed: Seed = None,
    reference: Reference = False,
    raw: Raw = False,
) -> None:
    """Chat with the run's policy: one line per turn from stdin, until end of input or /exit (/reset forgets)."""
    from psipo_cli.tools.generate import Sampling, chat_loop, open_generator, stdin_reader

    sampling = Sampling(max_new_tokens, temperature, seed)
    generator = open_generator(run, sampling, reference, raw)
    err_console.print(f"{generator.describe()}; /exit or end of input to stop, /reset to forget", markup=False)
    chat_loop(generator, stdin_reader(), lambda text: stdout.print(text, markup=False), sampling)


@app.command()
def push(
    run: RunArg,
    repo_id: Annotated[str | None, typer.Option(help="Hub repository; default: output.hub_model_id.")] = None,
    public: Annotated[bool, typer.Option(help="Create a missing repository public (default: private).")] = False,
) -> None:
    """Upload a finished run (adapter, tokenizer, model card, metrics; no checkpoints) to the Hugging Face Hub."""
    from psipo_cli.tools.hub import push_finished_run

    stdout.print(f"pushed to {push_finished_run(run, repo_id, private=not public)}", markup=False)


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Finished run directory, or its recipe.", show_default=False)],
    overrides: OverridesArg = None,
    data: Annotated[
        str | None,
        typer.Option(help="Pairs to evaluate, or prompts only with --generate (file or hub id); default: data.eval."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Per-pair results (.jsonl); default: RUN/eval/pairs.jsonl.")] = None,
    generate: Annotated[int, typer.Option(min=0, help="Also sample N responses per prompt from π and π_ref.")] = 0,
    prompts: Annotated[int, typer.Option(min=1, help="Prompts to sample from (with --generate).")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest sampled response (with --generate).")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace existing eval results.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of the table.")] = False,
) -> None:
    """Score a finished run on preference pairs: margins, reward accuracy, loss, drift (and KL with --generate, and
    for rlhf/online_psipo runs the reward model's mean reward)."""
    import json

    from psipo_cli.tools.eval_report import print_report
    from psipo_cli.tools.evaluate import EvalOptions, evaluate_run

    options = EvalOptions(data, out, generate, prompts, max_new_tokens, overwrite)
    summary = evaluate_run(run, overrides, options)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_report(summary, stdout)


@app.command()
def plot(
    run: Annotated[Path, typer.Argument(help="Run directory, finished or in progress.", show_default=False)],
) -> None:
    """Draw a run's metrics as PNGs in RUN/plots/ (one per metric, and overview.png)."""
    from psipo_cli.tools.plots import write_plots

    for path in write_plots(run):
        stdout.print(str(path), markup=False)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run directories.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Directory for the overlaid plots.")] = Path("psipo-compare"),
    overwrite: Annotated[bool, typer.Option(help="Replace plots already in --out.")] = False,
) -> None:
    """Overlay several runs' metrics in one set of plots and tabulate their final metrics."""
    from psipo_cli.tools.compare import compare_runs, print_table

    paths, table = compare_runs(runs, out, overwrite=overwrite)
    print_table(table, stdout)
    for path in paths:
        stdout.print(str(path), markup=False)


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
    batch_size: Annotated[int, typer.Option(min=1, help="Texts scored per forward pass.")] = 32,
) -> None:
    """Write DATA back with p̂ = σ(r(chosen) − r(rejected)) from a trained reward model."""
    from psipo_cli.tools.label import label_file

    report = label_file(run, data, out, column, overwrite, batch_size)
    cut = f"; {report.truncated} pairs cut to data.max_length={report.max_length} tokens as in training"
    stdout.print(
        f"{report.rows} pairs labelled, mean p̂ {report.mean_p_hat:.3f}; the reward model agrees with the "
        f"chosen/rejected order on {report.agreement:.1%} of them{cut if report.truncated else ''}; wrote {report.out}",
        markup=False,
    )


@app.command()
def bandit(
    actions: Annotated[str, typer.Option(help="Action names, e.g. a,b,c.", show_default=False)],
    pairs: Annotated[
        str,
        typer.Option(
            help="Preferences 'a>b,b>c:0.8': winner>loser[:p̂]; may repeat. Online losses read them as the "
            "preference model P(a ≻ b), each pair once, unlisted pairs ½."
        ),
    ],
    loss: Annotated[
        list[str],
        typer.Option(
            help="ipo, dpo, psipo, or online-ipo, online-psipo (pairs drawn from the policy and labelled by "
            "--pairs); repeat for several."
        ),
    ] = ("ipo", "dpo"),
    tau: Annotated[list[float], typer.Option(help="Regularisation τ > 0; repeat for several.")] = (0.1, 0.5, 1.0),
    psi: Annotated[str, typer.Option(help="Ψ of --loss psipo and online-psipo: identity or logit.")] = "identity",
    mixture: Annotated[
        float,
        typer.Option(help="β of online losses: draw pairs from π^(1−β)·π_ref^β, normalised (IPO-MD); 0 is online IPO."),
    ] = 0.0,
    steps: Annotated[int, typer.Option(help="Adam steps.")] = 18_000,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 0.01,
    batch: Annotated[int, typer.Option(help="Pairs per step, drawn with replacement (online: from the policy).")] = 9,
    seeds: Annotated[int, typer.Option(help="Independent runs per (loss, τ).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the first run's random stream.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of the table.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write learning curves to this .png.", show_default=False)] = None,
) -> None:
    """Train the paper's tabular bandit examples, offline or online, and compare with the closed-form optimum."""
    from psipo_cli.paper.bandit_report import check_plot_path, print_table, run_bandit, save_plot, to_json

    if plot is not None:
        check_plot_path(plot)
    report = run_bandit(actions, pairs, loss, tau, psi, steps, lr, batch, seeds, seed, mixture)
    if plot is not None:
        save_plot(report, plot)
    if as_json:
        typer.echo(to_json(report))
        return
    print_table(report, stdout)
    if plot is not None:
        stdout.print(f"plot: {plot}", markup=False)


@app.command()
def frontier(
    out: Annotated[Path, typer.Option(help="Folder for frontier.json, frontier.md and the two figures.")] = Path(
        "docs"
    ),
    quick: Annotated[
        bool, typer.Option(help="A small version (one τ, one seed, a few steps): the test suite's.")
    ] = False,
    tau: Annotated[list[float] | None, typer.Option(help="τ; repeat for several (default: 0.01, 0.05, 0.25).")] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(help="dpo, ipo, psipo-logit, rlhf, online-ipo, dpo-soft, ipo-soft; repeat (default: all)."),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds: data draw, reward model, training (default: 2).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per run (default: 240).")] = None,
    workers: Annotated[int | None, typer.Option(help="Runs trained at once, one CPU thread each (default: 2).")] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="Keep the runs in this new folder (default: a temporary one).", show_default=False),
    ] = None,
) -> None:
    """The paper's claim on generations: DPO, IPO, ΨPO, RLHF and online IPO judged by a known gold preference."""
    from psipo_cli.paper.frontier import Settings
    from psipo_cli.paper.frontier_run import run_experiment

    settings = Settings.from_options(quick, taus=tau, methods=method, seeds=seeds, steps=steps, workers=workers)
    for path in run_experiment(settings, out, work, lambda line: stdout.print(line, markup=False)):
        stdout.print(f"wrote {path}", markup=False)


def main() -> None:
    """Entry point: user errors become one line and exit code 2; `PSIPO_DEBUG=1` shows the traceback.

    Usage errors (unknown option, missing argument) are click's own, also exit code 2.
    """
    sys.argv[1:] = resume_path_option(sys.argv[1:])
    silence_library_noise()
    try:
        app()
    except UserError as err:
        if os.environ.get("PSIPO_DEBUG"):
            raise
        if err.echo:
            err_console.print(f"error: {err}", markup=False)
        sys.exit(EXIT_USER_ERROR)
    except RunStopped as stop:
        err_console.print(f"stopped: {stop}", markup=False)
        sys.exit(stop.exit_code)
    except OSError as err:
        if err.errno not in DISK_ERRNOS or os.environ.get("PSIPO_DEBUG"):
            raise
        # label, eval, merge, ... write whole files or nothing (run.files), so nothing half-written is left
        err_console.print(f"stopped: writing {err.filename or 'a file'} failed ({err.strerror})", markup=False)
        sys.exit(EXIT_WRITE_FAILED)
    except KeyboardInterrupt:
        err_console.print("stopped at once (second interrupt); the newest complete checkpoint is intact")
        sys.exit(130)


def silence_library_noise() -> None:
    """Keep psipo's output readable: no per-map progress bars from datasets, no deprecation warnings about our
    pinned libraries' internals (a user cannot act on them). Runs before those libraries are imported."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)


def resume_path_option(args: list[str]) -> list[str]:
    """`--resume PATH` → `--resume-from PATH` when PATH is an existing directory.

    click has no option with an optional value; an existing directory can never be a positional argument here (the
    recipe is a file, overrides hold '='), so reading it as --resume's value is unambiguous.
    """
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg == "--resume" and Path(out[i + 1]).is_dir():
            out[i] = "--resume-from"
    return out


if __name__ == "__main__":
    main()
