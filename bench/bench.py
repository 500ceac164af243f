"""psipo's IPO trainer against stock TRL 1.16 `DPOTrainer(loss_type=["ipo"])`, like with like, on CPU.

Run it from the repository root:

    make bench                              # or: python bench/bench.py  (about 15 minutes on 2 cores)
    python bench/bench.py --quick           # tiny smoke configuration (about a minute)
    python bench/bench.py --out my.json     # figures to my.json instead of bench/results.json

What is compared. A random-init `LlamaConfig` model (fp32; hidden 512, 4 layers, 8 heads, MLP 1376, 12.7M
non-embedding parameters, the tiny tokenizer's 768-token vocabulary, saved to a temp dir with
`assets/tiny-llama`'s tokenizer, so both trainers load the same weights from disk), a new LoRA adapter
(r 16, alpha 32, no dropout, all linear layers), batch 4, max_length 512, IPO with τ = 0.1 (token-mean
log-probs in both), constant learning rate, seed 0. psipo is built through its own API (a recipe dict →
`psipo_cli.training.finetune.prepare` + `build_trainer`) with `training.prefix_sharing` true ("shared": one
`[prompt | chosen | rejected]` row per pair) and false ("concat": TRL's layout, 2 rows per pair); TRL is built
directly (`DPOConfig` + `DPOTrainer(peft_config=LoraConfig(...))`). Each configuration is one subprocess
(`bench.py --one SPEC`), 1 warm-up + 3 timed steps, 3 repeats with the arms alternating (order reversed on every
other repeat), and the table shows medians. Per-step reference: both shapes, gradient checkpointing off and on;
precomputed reference: both shapes, checkpointing off. Timings are only meaningful on an otherwise idle machine:
with 2 threads on 2 cores, any other busy process slows every step several-fold (the load average before each
run is kept in the JSON).

Data. Two synthetic shapes written as plain prompt/chosen/rejected jsonl: random words that are single tokens
of the tiny vocabulary, so every pair tokenises to exactly the same lengths (TRL appends EOS to each response):
"prompt-heavy" 192 prompt + 64 + 64 response tokens (HH-RLHF, MetaMath) and "response-heavy" 64 + 160 + 160
(UltraFeedback). The dataset holds exactly (warm-up + timed steps) × batch pairs: one epoch, and a precompute
pass covers exactly the pairs trained on.

Numbers (per configuration, median over repeats):
- tokens/s: real training tokens per second, counted by this script from the tokenised data the same way for
  both trainers: prompt + chosen + rejected, prompt counted once, no padding. Timed from the end of the last
  warm-up step to the end of the last step (TrainerCallback.on_step_end), so data collation, forward,
  backward and optimizer step are all inside, warm-up and model loading are not.
- samples/s: preference pairs per second over the same window (its ratio equals the tokens/s ratio).
- peak RSS: the run process's peak resident set (VmHWM, model load included); `rss_train_peak_mib` in the JSON
  is the peak sampled (psutil, 20 ms) during training only.
- MFU: model FLOPs per real token / measured matmul peak. Per token: (4 + 2r)·N + (3 + r)·4·n_layer·c·d_attn,
  where N = non-embedding parameters (transformer blocks only; embeddings, LM head and the tiny LoRA matrices
  are not counted), 4N = the frozen policy's forward + activation gradients (no weight gradients under LoRA),
  2N = the reference forward (r = 1 when computed per step, 0 when precomputed), c = the token's own causal
  context (prompt tokens: their position; response tokens: prompt + position in the response), attention
  backward = 2× its forward. The same count per real token for both trainers, so MFU ratios equal throughput
  ratios: work a layout repeats (TRL's second prompt) or pads is not counted as useful. Gradient
  checkpointing's recomputation is not counted either (model FLOPs, not hardware FLOPs). The peak is the best
  of a timed 2048² fp32 `torch.mm` on the same threads, measured at the start and end of the run.
- precompute: with `precompute_ref_log_probs` (TRL) / `objective.precompute_ref_log_probs` (psipo) the
  reference pass over the dataset is timed on its own (`precompute_s`) and excluded from the step timing.
- ratio: psipo / TRL for each number (> 1 means psipo is faster, or uses more memory for RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout's psipo, whatever else is installed
TOKENIZER_DIR = REPO / "assets" / "tiny-llama"
DEFAULT_OUT = REPO / "bench" / "results.json"
THREADS = 2
TAU = 0.1
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "WANDB_MODE": "disabled",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}

FULL = {
    "model": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 1376},
    # name -> (prompt tokens, tokens of each response with its EOS)
    "shapes": {"prompt-heavy": (192, 64), "response-heavy": (64, 160)},
    "batch": 4,
    "max_length": 512,
    "warmup": 1,
    "steps": 3,
    "repeats": 3,
    "gc": [False, True],
    "precompute_shapes": ["prompt-heavy", "response-heavy"],
}
QUICK = {
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 172},
    "shapes": {"prompt-heavy": (24, 8)},
    "batch": 4,
    "max_length": 64,
    "warmup": 1,
    "steps": 2,
    "repeats": 1,
    "gc": [False],
    "precompute_shapes": [],
}


# ----------------------------------------------------------------------------------------------- workers
# Each runs in its own process (`bench.py --one SPEC`) and prints one JSON line.


def _single_token_words(tokenizer: Any) -> list[str]:
    """Vocabulary entries ' word' (letters only) that encode back to exactly one token."""
    words = []
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        word = len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
        if word and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
            words.append(text)
    return sorted(words)


def _pair_lengths(tokenizer: Any, row: dict[str, str]) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts as TRL's DPOTrainer tokenises a plain row (EOS appended)."""
    eos = tokenizer.eos_token

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(row["prompt"])
    chosen, rejected = ids(row["prompt"] + row["chosen"] + eos), ids(row["prompt"] + row["rejected"] + eos)
    assert chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt, "prompt is not a token prefix"
    return len(prompt), len(chosen) - len(prompt), len(rejected) - len(prompt)


def _write_shape(path: Path, words: list[str], prompt: int, response: int, pairs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(pairs):
        text = ["".join(rng.choices(words, k=n)) for n in (prompt, response - 1, response - 1)]
        while text[2] == text[1]:
            text[2] = "".join(rng.choices(words, k=response - 1))
        rows.append({"prompt": text[0], "chosen": text[1], "rejected": text[2]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def worker_setup(spec: dict[str, Any]) -> dict[str, Any]:
    """Random-init model + tiny tokenizer saved to spec['dir']; one jsonl per data shape; the counts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(spec["dir"])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    dims = spec["model"]
    config = LlamaConfig(
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    words = _single_token_words(tokenizer)
    shapes = {}
    for index, (name, (prompt, response)) in enumerate(spec["shapes"].items()):
        rows = _write_shape(out / f"{name}.jsonl", words, prompt, response, spec["pairs"], seed=index)
        lengths = {_pair_lengths(tokenizer, row) for row in rows}
        assert lengths == {(prompt, response, response)}, f"{name}: token lengths {lengths}"
        assert prompt + response <= spec["max_length"], f"{name}: longer than max_length"
        shapes[name] = {"prompt": prompt, "response": response, "tokens_per_pair": prompt + 2 * response}
    from psipo_cli.recipe.schema import TrainingSection

    return {
        "has_prefix_sharing": "prefix_sharing" in TrainingSection.model_fields,
        "params_total": total,
        "params_non_embedding": total - embedding,
        "n_layer": config.num_hidden_layers,
        "d_attn": config.num_attention_heads * config.head_dim,
        "vocab_size": config.vocab_size,
        "single_token_words": len(words),
        "shapes": shapes,
    }


def worker_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """Best fp32 GFLOP/s of an n×n matmul on THREADS threads."""
    import torch

    torch.set_num_threads(THREADS)
    n = spec["n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(spec["trials"]):
        started = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / 3)
    return {"n": n, "gflops": 2 * n**3 / best / 1e9}


def _rss_hwm_mib() -> float:
    """Peak RSS of this process: VmHWM (per address space, so unaffected by the parent), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_timer(warmup: int) -> Any:
    """A TrainerCallback recording step begin/end times and sampling RSS while training runs."""
    import threading

    import psutil
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []
            self.rss_peak = 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)

        def _sample(self) -> None:
            process = psutil.Process()
            while not self._stop.wait(0.02):
                self.rss_peak = max(self.rss_peak, process.memory_info().rss)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._thread.start()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._stop.set()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end.append(time.perf_counter())
            if len(self.end) == warmup:
                self._cpu = _cpu_seconds()

        def _foreign_cpu(self) -> float:
            """Share of the machine's CPU used by other processes during the timed steps (contention)."""
            (busy0, own0), (busy1, own1) = self._cpu, _cpu_seconds()
            return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((self.end[-1] - self.end[warmup - 1]) * os.cpu_count())

        def figures(self) -> dict[str, Any]:
            timed = len(self.end) - warmup
            return {
                "timed_steps": timed,
                "timed_s": self.end[-1] - self.end[warmup - 1],
                "step_compute_s": [e - b for b, e in zip(self.begin[warmup:], self.end[warmup:], strict=True)],
                "warmup_step_s": [e - b for b, e in zip(self.begin[:warmup], self.end[:warmup], strict=True)],
                "rss_train_peak_mib": self.rss_peak / 2**20,
                "foreign_cpu_share": self._foreign_cpu(),
            }

    return StepTimer()


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used)."""
    import psutil

    total = psutil.cpu_times()
    own = psutil.Process().cpu_times()
    return total.user + total.nice + total.system + total.irq + total.softirq, own.user + own.system


def _time_precompute() -> list[float]:
    """Time the reference precompute pass, wherever it is called from: TRL's (stock TRL) and psipo's own."""
    from trl.trainer import dpo_trainer

    from psipo_cli.training.preference import PsipoTrainer

    seconds: list[float] = []

    def timed(original: Any) -> Any:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - started)

        return run

    dpo_trainer.DPOTrainer._precompute_ref_logps = timed(dpo_trainer.DPOTrainer._precompute_ref_logps)
    PsipoTrainer.precompute_reference = timed(PsipoTrainer.precompute_reference)
    return seconds


def _psipo_trainer(spec: dict[str, Any], out: Path) -> Any:
    from psipo_cli.recipe.schema import Recipe, TrainingSection
    from psipo_cli.training.finetune import build_trainer, prepare

    training = {
        "learning_rate": 1e-4,
        "max_steps": spec["warmup"] + spec["steps"],
        "per_device_train_batch_size": spec["batch"],
        "gradient_checkpointing": spec["gc"],
        "logging_steps": 10_000,
        "save_steps": 10_000,
        "lr_scheduler_type": "constant",
        "seed": 0,
    }
    if "prefix_sharing" in TrainingSection.model_fields:
        training["prefix_sharing"] = spec["layout"] == "shared"
    elif spec["layout"] != "concat":
        raise SystemExit("this psipo has no training.prefix_sharing")
    recipe = Recipe.model_validate(
        {
            "model": {"name_or_path": spec["model"], "dtype": "float32"},
            "adapter": LORA,
            "data": {"train": spec["data"], "max_length": spec["max_length"]},
            "objective": {"loss": "ipo", "tau": TAU, "precompute_ref_log_probs": spec["precompute"]},
            "training": training,
            "output": {"dir": str(out)},
        }
    )
    assert recipe.objective.logps == "mean", "psipo IPO must use token-mean log-probs, like TRL's IPO"
    return build_trainer(prepare(recipe, overwrite=True))


def _trl_trainer(spec: dict[str, Any], out: Path) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    args = DPOConfig(
        output_dir=str(out),
        loss_type=["ipo"],
        beta=TAU,
        learning_rate=1e-4,
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_checkpointing=spec["gc"],
        max_length=spec["max_length"],
        truncation_mode="keep_start",
        precompute_ref_log_probs=spec["precompute"],
        lr_scheduler_type="constant",
        optim="adamw_torch",
        seed=0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        disable_dropout=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10_000,
    )
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    return DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one trainer, train warm-up + timed steps, return the timings."""
    import torch

    torch.set_num_threads(THREADS)
    precompute = _time_precompute()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="psipo-bench-run-") as tmp:
        build = _psipo_trainer if spec["trainer"] == "psipo" else _trl_trainer
        trainer = build(spec, Path(tmp) / "run")
        build_s = time.perf_counter() - started
        timer = _step_timer(spec["warmup"])
        trainer.add_callback(timer)
        result = trainer.train()
    return {
        **timer.figures(),
        "build_s": build_s,
        "precompute_s": sum(precompute) if precompute else None,
        "train_loss": result.training_loss,
        "steps_run": result.global_step,
        "rss_peak_mib": _rss_hwm_mib(),
    }


WORKERS = {"setup": worker_setup, "peak": worker_peak, "train": worker_train}


# ------------------------------------------------------------------------------------------------ driver


def run_one(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one worker in a fresh process (own datasets cache, so no cached precompute is reused)."""
    cache = tempfile.mkdtemp(prefix="hf-datasets-", dir=work)
    env = {**os.environ, **ENV, "HF_DATASETS_CACHE": cache}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench worker failed ({spec.get('kind')}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1]), "process_wall_s": time.perf_counter() - started}


def flops_per_token(meta: dict[str, Any], shape: str, ref_per_step: bool) -> float:
    """Model FLOPs per real token of `shape` (see the module docstring), the same for both trainers."""
    s = meta["shapes"][shape]
    p, c = s["prompt"], s["response"]
    n, layers, d = meta["params_non_embedding"], meta["n_layer"], meta["d_attn"]
    r = 1 if ref_per_step else 0
    contexts = p * (p + 1) / 2 + 2 * (c * p + c * (c + 1) / 2)  # Σ over the pair's real tokens of their context
    tokens = s["tokens_per_pair"]
    return (4 + 2 * r) * n + (3 + r) * 4 * layers * d * contexts / tokens


def _arms(has_prefix_sharing: bool) -> list[tuple[str, str]]:
    """(trainer, layout) arms; psipo's prefix-shared arm only where the recipe key exists."""
    psipo = [("psipo", "shared"), ("psipo", "concat")] if has_prefix_sharing else [("psipo", "concat")]
    return [*psipo, ("trl", "concat")]


def _configs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    configs = [{"shape": shape, "gc": gc, "precompute": False} for gc in plan["gc"] for shape in plan["shapes"]]
    configs += [{"shape": shape, "gc": False, "precompute": True} for shape in plan["precompute_shapes"]]
    return configs


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]], tokens_per_step: int, batch: int, flops: float, peak: float) -> dict:
    """Medians over the repeats of one (configuration, arm)."""
    tps = [tokens_per_step * run["timed_steps"] / run["timed_s"] for run in runs]
    sps = [batch * run["timed_steps"] / run["timed_s"] for run in runs]
    tokens_s = statistics.median(tps)
    return {
        "tokens_per_s": tokens_s,
        "samples_per_s": statistics.median(sps),
        "tokens_per_s_runs": tps,
        "peak_rss_mib": _median(runs, "rss_peak_mib"),
        "train_peak_rss_mib": _median(runs, "rss_train_peak_mib"),
        "mfu": tokens_s * flops / (peak * 1e9),
        "precompute_s": _median(runs, "precompute_s"),
        "build_s": _median(runs, "build_s"),
        "train_loss": _median(runs, "train_loss"),
        "runs": runs,
    }


def ratios(psipo: dict[str, Any], trl: dict[str, Any]) -> dict[str, float | None]:
    keys = ("tokens_per_s", "samples_per_s", "peak_rss_mib", "train_peak_rss_mib", "mfu", "precompute_s")
    return {k: (psipo[k] / trl[k] if psipo.get(k) and trl.get(k) else None) for k in keys}


def measure_config(
    config: dict[str, Any], plan: dict[str, Any], meta: dict, data: dict, work: Path, arms: list, log: Any
) -> dict[str, list]:
    """All repeats of one configuration, arms alternating (order reversed on every other repeat)."""
    results: dict[str, list] = {f"{t}/{layout}": [] for t, layout in arms}
    for repeat in range(plan["repeats"]):
        order = arms if repeat % 2 == 0 else arms[::-1]
        for trainer, layout in order:
            spec = {
                "kind": "train",
                "trainer": trainer,
                "layout": layout,
                "model": str(work / "model"),
                "data": data[config["shape"]],
                "batch": plan["batch"],
                "max_length": plan["max_length"],
                "warmup": plan["warmup"],
                "steps": plan["steps"],
                **config,
            }
            load = os.getloadavg()[0]
            run = run_one(spec, work)
            run["loadavg_1m_before"] = load
            results[f"{trainer}/{layout}"].append(run)
            log(
                f"  {config['shape']:<15} gc={config['gc']!s:<5} precompute={config['precompute']!s:<5} "
                f"{trainer}/{layout:<6} repeat {repeat + 1}: {run['timed_s']:.1f}s timed, "
                f"other processes {run['foreign_cpu_share']:.0%} CPU"
            )
    return results


def measure(plan: dict[str, Any], log: Any) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="psipo-bench-") as tmp:
        work = Path(tmp)
        pairs = (plan["warmup"] + plan["steps"]) * plan["batch"]
        meta = run_one({"kind": "setup", "dir": str(work), "pairs": pairs, **plan}, work)
        data = {name: str(work / f"{name}.jsonl") for name in plan["shapes"]}
        peaks = [run_one({"kind": "peak", "n": 2048, "trials": 5}, work)["gflops"]]
        arms = _arms(meta["has_prefix_sharing"])
        log(f"model: {meta['params_non_embedding'] / 1e6:.1f}M non-embedding params; peak {peaks[0]:.1f} GFLOP/s")
        rows = []
        for config in _configs(plan):
            rows.append({**config, "raw": measure_config(config, plan, meta, data, work, arms, log)})
        peaks.append(run_one({"kind": "peak", "n": 2048, "trials": 5}, work)["gflops"])
    peak = max(peaks)
    for row in rows:
        shape = meta["shapes"][row["shape"]]
        flops = flops_per_token(meta, row["shape"], ref_per_step=not row["precompute"])
        tokens_per_step = shape["tokens_per_pair"] * plan["batch"]
        row["flops_per_token"] = flops
        row["tokens_per_step"] = tokens_per_step
        row["arms"] = {
            arm: summarise(runs, tokens_per_step, plan["batch"], flops, peak) for arm, runs in row.pop("raw").items()
        }
        trl = row["arms"]["trl/concat"]
        row["ratios"] = {arm: ratios(s, trl) for arm, s in row["arms"].items() if arm != "trl/concat"}
    foreign = [run["foreign_cpu_share"] for row in rows for s in row["arms"].values() for run in s["runs"]]
    return {
        "plan": plan,
        "model": meta,
        "foreign_cpu_share_max": max(foreign),
        "foreign_cpu_share_median": statistics.median(foreign),
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_runs": peaks,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def machine() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo").splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "cpus_visible": os.cpu_count(),
        "threads": THREADS,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: metadata.version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")},
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


ARM_LABEL = {"psipo/shared": "psipo prefix-shared", "psipo/concat": "psipo concatenated"}


def table(results: dict[str, Any]) -> str:
    """The markdown table: one line per (configuration, psipo layout), TRL alongside."""
    lines = [
        "| data | grad ckpt | reference | psipo layout | tokens/s psipo | tokens/s TRL | ratio | samples/s psipo / TRL "
        "| peak RSS MiB psipo / TRL (ratio) | MFU psipo / TRL |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        trl = row["arms"]["trl/concat"]
        ref = "precomputed" if row["precompute"] else "per step"
        for arm, ratio in row["ratios"].items():
            mine = row["arms"][arm]
            lines.append(
                f"| {row['shape']} | {'on' if row['gc'] else 'off'} | {ref} | {ARM_LABEL[arm].split()[1]} "
                f"| {mine['tokens_per_s']:.0f} | {trl['tokens_per_s']:.0f} | **{ratio['tokens_per_s']:.2f}×** "
                f"| {mine['samples_per_s']:.2f} / {trl['samples_per_s']:.2f} "
                f"| {mine['peak_rss_mib']:.0f} / {trl['peak_rss_mib']:.0f} ({ratio['peak_rss_mib']:.2f}×) "
                f"| {mine['mfu']:.1%} / {trl['mfu']:.1%} |"
            )
    pre = [row for row in results["rows"] if row["precompute"]]
    if pre:
        lines += [
            "",
            "| data | precompute pass s: " + " / ".join(ARM_LABEL.get(a, "TRL") for a in pre[0]["arms"]) + " |",
            "|---|---|",
        ]
        for row in pre:
            values = " / ".join(
                "—" if s["precompute_s"] is None else f"{s['precompute_s']:.1f}" for s in row["arms"].values()
            )
            lines.append(f"| {row['shape']} | {values} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (about a minute)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON of all figures (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm and configuration")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (at least 1)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        spec = json.loads(args.one)
        print(json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
        return
    plan = dict(QUICK if args.quick else FULL)
    for key in ("repeats", "steps", "warmup"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if plan["warmup"] < 1 or plan["steps"] < 1:
        raise SystemExit("--warmup and --steps must be at least 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load = os.getloadavg()
    if load[0] > 1.0:
        log(f"warning: 1-minute load average {load[0]:.1f} before starting: other processes compete for the CPU")
    results = {"machine": machine(), "quick": args.quick, **measure(plan, log)}
    results["loadavg_1m_start_end"] = [load[0], os.getloadavg()[0]]
    results["table"] = table(results)
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(results["table"])
    if results["foreign_cpu_share_max"] > 0.1:
        print(
            f"\nwarning: other processes used up to {results['foreign_cpu_share_max']:.0%} of the CPU during timed "
            "steps: these timings are not clean"
        )
    print(
        f"\n{results['machine']['cpu']}, {THREADS} threads, torch {results['machine'].get('torch')}; "
        f"matmul peak {results['matmul_peak_gflops']:.0f} GFLOP/s; wall {results['wall_s'] / 60:.1f} min; "
        f"figures in {out}"
    )


if __name__ == "__main__":
    main()
