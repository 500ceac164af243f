"""Running `psipo frontier` (the experiment `frontier` describes): each seed's data and reward model, then every
(method, τ, seed) trained by psipo and judged, in worker processes, into one JSON document.

Seeds of the random streams, all derived from the experiment seed s: responses of the data s, the annotators' votes
s, training s; judging samples JUDGE_SEED + 2s (policies) and JUDGE_SEED + 2s + 1 (π_ref, drawn once per seed and
kept in SEED/reference.json so every run of the seed is judged against the same draw).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError
from psipo_cli.paper.frontier import DATA, METHODS, RECIPES, Settings, method_overrides, run_dir
from psipo_cli.paper.frontier_eval import Judge, preference_pairs, sample
from psipo_cli.paper.gold import GOLD_SCALE, GOLD_SEED, GoldReward
from psipo_cli.run.files import write_jsonl_atomic

JUDGE_SEED = 10_000
HELD_OUT_SEED = 20_000  # the reward model's held-out pairs, drawn on the evaluation prompts


def plain_prompts(path: Path, limit: int) -> list[str]:
    """The distinct plain-text prompts of a shipped pairs file, in file order (the chat-format rows are left out:
    one prompt format keeps sampling and scoring the same for every method)."""
    prompts: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["prompt"]
        if isinstance(prompt, str):
            prompts[prompt] = None
    return list(prompts)[: limit or None]


def _load(recipe_name: str, overrides: list[str]) -> Any:
    from psipo_cli.recipe.loader import load_recipe

    return load_recipe(RECIPES / recipe_name, overrides)


def _train(recipe: Any, log: Path) -> dict[str, Any]:
    """One psipo run, its (quiet) output in `log`; returns its summary."""
    from psipo_cli.training.finetune import run

    with log.open("w", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        return run(recipe, overwrite=True)


def _base() -> tuple[Any, Any, Any]:
    """The tiny reference model (eval mode, with the fused LM head scoring uses), its tokenizer and recipe."""
    from trl.trainer.utils import add_fused_lm_head

    from psipo_cli.models.loading import load_base_model, load_tokenizer

    recipe = _load("tiny-ipo.yaml", [])
    model = load_base_model(recipe).eval()
    add_fused_lm_head(model)
    return model, load_tokenizer(recipe.model), recipe


def _judge(settings: Settings, tokenizer: Any, folder: Path, seed: int, model: Any = None) -> Judge:
    """The seed's judge. With `model` (the base, π_ref), draw its reference samples now and keep their gold rewards
    in FOLDER/reference.json; without, read them back."""
    prompts = [tokenizer(text)["input_ids"] for text in plain_prompts(DATA / "eval.jsonl", settings.eval_prompts)]
    gold, path = GoldReward(tokenizer), folder / "reference.json"
    sizes = (settings.samples_per_prompt, settings.max_new_tokens, JUDGE_SEED + 2 * seed)
    if model is None:
        return Judge(tokenizer, gold, prompts, json.loads(path.read_text(encoding="utf-8")), *sizes)
    judge = Judge.for_reference(model, tokenizer, gold, prompts, *sizes, reference_seed=JUDGE_SEED + 2 * seed + 1)
    path.write_text(json.dumps(judge.reference_rewards), encoding="utf-8")
    return judge


def _draw_pairs(settings: Settings, model: Any, tokenizer: Any, source: Path, limit: int, seed: int) -> Any:
    texts = plain_prompts(source, limit)
    responses = sample(model, tokenizer, [tokenizer(t)["input_ids"] for t in texts], 2, settings.max_new_tokens, seed)
    return preference_pairs(texts, responses, tokenizer, GoldReward(tokenizer), settings.soft_annotators, seed)


def _reward_model_agreement(folder: Path, pairs: str) -> float:
    """Share of FOLDER/<pairs>.jsonl where the seed's reward model orders the pair as the gold reward does."""
    from psipo_cli.tools.label import label_file

    out = folder / f"{pairs}-labelled.jsonl"
    label_file(folder / "reward", str(folder / f"{pairs}.jsonl"), out, overwrite=True)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return sum((row["p_hat"] > 0.5) == (row["p_gold"] > 0.5) for row in rows) / len(rows)


def prepare_seed(settings: Settings, work: Path, seed: int) -> dict[str, Any]:
    """The seed's data (hard, soft, reward-labelled pairs), its reward model and π_ref's judged samples, in
    WORK/seed<s>/; returns what the JSON reports of them."""
    folder = work / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer, base_recipe = _base()
    draw = _draw_pairs(settings, model, tokenizer, DATA / "train.jsonl", settings.train_prompts, seed)
    write_jsonl_atomic(folder / "hard.jsonl", draw.hard)
    write_jsonl_atomic(folder / "soft.jsonl", draw.soft)
    info: dict[str, Any] = {"pairs": len(draw.hard), "identical_left_out": draw.identical, "empty_left_out": draw.empty}
    info["soft_p_hat_mean"] = sum(row["p_chosen"] for row in draw.soft) / len(draw.soft)
    info["soft_deterministic_share"] = sum(row["p_chosen"] == 1.0 for row in draw.soft) / len(draw.soft)
    info["hard_agrees_with_gold"] = sum(row["p_gold"] > 0.5 for row in draw.hard) / len(draw.hard)
    # Step 0 of every curve: π_ref judged against an independent draw of itself (its KL is 0 by construction).
    judge = _judge(settings, tokenizer, folder, seed, model)
    info["reference"] = judge(model, contextlib.nullcontext, base_recipe).as_dict()
    if any(METHODS[name].uses_reward_model for name in settings.methods):
        overrides = [f"data.train={folder / 'hard.jsonl'}", "data.eval=null", f"training.seed={seed}"]
        overrides += [f"training.max_steps={settings.reward_steps}", f"output.dir={folder / 'reward'}"]
        _train(_load("tiny-reward.yaml", overrides), folder / "reward.log")
        held_out = _draw_pairs(settings, model, tokenizer, DATA / "eval.jsonl", 0, HELD_OUT_SEED + seed)
        write_jsonl_atomic(folder / "held-out.jsonl", held_out.hard)
        info["reward_model_agrees_with_gold"] = {
            "training_pairs": _reward_model_agreement(folder, "hard"),
            "held_out_pairs": _reward_model_agreement(folder, "held-out"),
        }
        (folder / "hard-labelled.jsonl").rename(folder / "labelled.jsonl")  # psipo-logit's data
    return info


def train_and_judge(
    settings: Settings, name: str, tau: float, seed: int, work: Path, step0: dict[str, Any]
) -> dict[str, Any]:
    """Train one (method, τ, seed) and judge every checkpoint of it (`step0`: π_ref judged); the JSON's record."""
    from psipo_cli.models.loading import load_tokenizer
    from psipo_cli.run.directory import read_metrics
    from psipo_cli.tools.evaluate import load_models

    overrides = method_overrides(settings, name, tau, seed, work)
    recipe_name, folder = METHODS[name].recipe, run_dir(work, name, tau, seed)
    recipe = _load(recipe_name, overrides)
    started = time.perf_counter()
    summary = _train(recipe, folder.parent / f"{folder.name}.log")
    trained = time.perf_counter() - started
    judge = _judge(settings, load_tokenizer(recipe.model), work / f"seed{seed}", seed)
    curve = [{"step": 0, **step0}]
    for step in settings.judged_steps:
        final = step == settings.steps
        policy, as_reference = load_models(recipe, folder if final else folder / f"checkpoint-{step}")
        # The final policy keeps its per-prompt values: seeds are pooled prompt by prompt (frontier_report).
        curve.append({"step": step, **judge(policy, as_reference, recipe).as_dict(per_prompt=final)})
    train_log = [
        {key: m[key] for key in ("step", "margin", "reward", "kl_sequence", "loss") if key in m}
        for m in read_metrics(folder)
        if m["split"] == "train"
    ]
    return {
        "method": name,
        "tau": tau,
        "seed": seed,
        "recipe": f"recipes/{recipe_name}",
        "overrides": overrides,
        "train_seconds": trained,
        "judge_seconds": time.perf_counter() - started - trained,
        "train_steps_per_second": summary.get("train_steps_per_second"),
        "curve": curve,
        "train_log": train_log,
    }


def _init_worker() -> None:
    import torch
    import transformers

    from psipo_cli.cli import silence_library_noise

    silence_library_noise()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # two workers on two cores: one thread each, no oversubscription
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


Job = tuple[Callable[..., Any], tuple[Any, ...]]


def _map(settings: Settings, jobs: list[Job], report: Callable[[Any], None]) -> list[Any]:
    """Run jobs in `settings.workers` processes (in this one when 1), reporting each result as it lands; the first
    failure cancels the jobs not started and is raised."""
    if settings.workers == 1:
        results = []
        for function, args in jobs:
            results.append(function(*args))
            report(results[-1])
        return results
    context = get_context("spawn")  # a fresh interpreter per worker: no torch threads or state forked mid-use
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(function, *args) for function, args in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is not None:
                    pool.shutdown(cancel_futures=True)
                    raise future.exception()
                report(future.result())
        return [future.result() for future in futures]


def run_frontier(settings: Settings, work: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment; returns the JSON document (settings, data, every run)."""
    started = time.perf_counter()
    seeds = list(range(settings.seeds))
    data = _map(settings, [(prepare_seed, (settings, work, s)) for s in seeds], lambda info: say(f"data: {info}"))
    jobs: list[Job] = [
        (train_and_judge, (settings, name, tau, seed, work, data[seed]["reference"]))
        for seed in seeds
        for tau in settings.taus
        for name in settings.methods
    ]

    def progress(run: dict[str, Any]) -> None:
        final = run["curve"][-1]
        say(
            f"{run['method']:>11} τ={run['tau']:<5g} seed {run['seed']}: win rate {final['win_rate']['mean']:.3f}, "
            f"KL {final['kl']['mean']:.2f}  ({run['train_seconds']:.0f} s + {run['judge_seconds']:.0f} s)"
        )

    runs = _map(settings, jobs, progress)
    return {
        "settings": asdict(settings),
        "gold": {
            "seed": GOLD_SEED,
            "scale": GOLD_SCALE,
            "reward": "r*(y) = mean over y's tokens of w_v, w ~ N(0, scale²)",
        },
        "data": {str(seed): info for seed, info in zip(seeds, data, strict=True)},
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }


def run_experiment(settings: Settings, out: Path, work: Path | None, say: Callable[[str], None] = print) -> list[Path]:
    """`psipo frontier`: check the folders, run everything, write the outputs into `out`; their paths."""
    if not RECIPES.is_dir():
        raise UserError(
            "psipo frontier needs the source checkout's recipes/ and data/ (pip install -e .)", where=str(RECIPES)
        )
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UserError("exists and is not an empty folder; give a new folder for the runs", where=str(work))
    if out.exists() and not out.is_dir():
        raise UserError("is not a folder", where=str(out))
    from psipo_cli.paper.frontier_report import write_outputs

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="psipo-frontier-")))
        doc = run_frontier(settings, work, say)
    return write_outputs(doc, out, settings.command())
