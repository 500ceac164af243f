"""What runs inside the benchmark's worker processes (`bench.py --one SPEC`, one JSON line out).

- setup: the random-init model and tokenizer on disk, one jsonl per data shape, per-pair token counts.
- peak: the machine's fp32 matmul GFLOP/s on the benchmark's threads.
- arm: one arm of a race (race.py), its trainer built and trained one step per turn; every turn's time, the
  whole train() time and the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from race import Turns
from shapes import (
    contexts,
    draw_lengths,
    packing_figures,
    pair_lengths,
    single_token_words,
    statistics_of,
    write_pairs,
)

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "assets" / "tiny-llama"
THREADS = 2
TAU = 0.1
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}


def worker_setup(spec: dict[str, Any]) -> dict[str, Any]:
    """Random-init model + tiny tokenizer saved to spec['dir']; one jsonl per shape; each pair's counts."""
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
        max_position_embeddings=4096,
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
    words = single_token_words(tokenizer)
    shapes = {}
    for index, (name, data) in enumerate(spec["shapes"].items()):
        lengths = draw_lengths(name, data["pairs"], data["max_length"], seed=index)
        rows = write_pairs(out / f"{name}.jsonl", words, lengths, seed=index)
        measured = [pair_lengths(tokenizer, row) for row in rows]
        assert measured == lengths, f"{name}: the text does not tokenise to the lengths drawn"
        shapes[name] = {
            "tokens": [sum(pair) for pair in lengths],  # real tokens per pair: prompt once + both responses
            "contexts": [contexts(*pair) for pair in lengths],
            "statistics": statistics_of(lengths),
            "packing": packing_figures(name, data) if "pack_rows" in data else None,
        }
    from psipo_cli.recipe.schema import TrainingSection

    return {
        "has_prefix_sharing": "prefix_sharing" in TrainingSection.model_fields,
        "has_packing": "pack_tokens" in TrainingSection.model_fields,
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


# ------------------------------------------------------------------------------------------------ trainers


def _psipo_trainer(spec: dict[str, Any], layout: str, out: Path) -> Any:
    from psipo_cli.recipe.schema import Recipe
    from psipo_cli.training.finetune import build_trainer, prepare

    training = {
        "learning_rate": 1e-4,
        "max_steps": spec["steps"],
        # Packed: rows of pack_tokens per step, holding as many pairs as fit (token_budget.py)
        "per_device_train_batch_size": spec["pack_rows"] if layout == "packed" else spec["batch"],
        "gradient_checkpointing": spec["gc"],
        "logging_steps": 10_000,
        "save_steps": 10_000,
        "lr_scheduler_type": "constant",
        "seed": 0,
        "prefix_sharing": layout != "concat",
    }
    if layout == "packed":
        training["pack_tokens"] = spec["pack_tokens"]
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
        max_steps=spec["steps"],
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


def build(spec: dict[str, Any], arm: str, out: Path) -> Any:
    """One arm's trainer ('trl/concat' or 'psipo/<layout>'), reading the data in file order: every arm sees the
    same pairs at the same step, so step times compare like with like."""
    trainer_name, layout = arm.split("/")
    trainer = _trl_trainer(spec, out) if trainer_name == "trl" else _psipo_trainer(spec, layout, out)
    trainer.args.train_sampling_strategy = "sequential"
    return trainer


# --------------------------------------------------------------------------------------------- measuring


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used)."""
    import psutil

    total = psutil.cpu_times()
    own = psutil.Process().cpu_times()
    return total.user + total.nice + total.system + total.irq + total.softirq, own.user + own.system


def foreign_cpu_seconds(before: tuple[float, float]) -> float:
    """CPU seconds other processes used since `before` (contention): the machine's busy time minus this process's."""
    (busy0, own0), (busy1, own1) = before, _cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0))


def rss_hwm_mib() -> float:
    """Peak RSS of this process: VmHWM (per address space, so unaffected by the parent), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def _turn_timer(turns: Turns) -> Any:
    """A callback ending this arm's turn after each optimizer step and timing the turns: from being handed the
    turn (the batch is fetched and collated inside it) to the end of the step. The first turn also holds
    `train()`'s set-up, as a user's first step does."""
    from transformers import TrainerCallback

    class TurnTimer(TrainerCallback):
        def __init__(self) -> None:
            self.turn_s: list[float] = []
            self.foreign_cpu_s = 0.0
            self.began = self.ended = time.perf_counter()
            self._cpu = _cpu_seconds()

        def start(self) -> None:
            self.began, self._cpu = time.perf_counter(), _cpu_seconds()

        def end(self) -> None:
            self.ended = time.perf_counter()
            self.turn_s.append(self.ended - self.began)
            self.foreign_cpu_s += foreign_cpu_seconds(self._cpu)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end()
            if state.global_step < state.max_steps:  # after the last one, the turn lasts until train() returns
                turns.done()
                turns.wait()
                self.start()

    return TurnTimer()


def _record_batches(trainer: Any) -> list[list[list[int]]]:
    """Every batch the trainer's training loader collates, in order, as its pairs' (prompt, chosen, rejected) token
    counts: what each arm trained on, step by step (a packed arm's steps hold other pairs than TRL's). The loader's
    collate function is wrapped, not the trainer's collator, whose type psipo reads to plan packed batches."""
    batches: list[list[list[int]]] = []
    make_loader = trainer.get_train_dataloader

    def recording_loader() -> Any:
        loader = make_loader()
        inner = getattr(loader, "base_dataloader", loader)  # accelerate's adapter iterates the loader it wraps
        collate = inner.collate_fn

        def recording(examples: list[dict[str, Any]]) -> Any:
            batches.append([[len(e[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")] for e in examples])
            return collate(examples)

        inner.collate_fn = recording
        return loader

    trainer.get_train_dataloader = recording_loader
    return batches


def worker_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm of a race (race.py): a turn to build its trainer, then one turn per training step."""
    import torch

    torch.set_num_threads(THREADS)
    turns = Turns(*spec["fds"])
    precompute = _time_precompute()  # imports TRL and psipo's trainer: nothing heavy is left to load in a turn
    turns.done()  # ready: the driver hands out the first turn once every arm is
    with tempfile.TemporaryDirectory(prefix="psipo-bench-run-") as tmp:
        turns.wait()
        started = time.perf_counter()
        trainer = build(spec, spec["arm"], Path(tmp) / "run")
        build_s = time.perf_counter() - started
        timer = _turn_timer(turns)
        trainer.add_callback(timer)
        batches = _record_batches(trainer)
        rss_before_train = rss_hwm_mib()
        turns.done()
        turns.wait()
        timer.start()
        result = trainer.train()
        train_end_s = time.perf_counter() - timer.ended  # after the last step: train()'s own wrapping up
    figures = {
        "build_s": build_s,
        "precompute_s": sum(precompute) if precompute else None,
        "turn_s": timer.turn_s,
        "train_s": sum(timer.turn_s) + train_end_s,  # train()'s wall time, its waits for turns left out
        "foreign_cpu_share": timer.foreign_cpu_s / (sum(timer.turn_s) * (os.cpu_count() or 1)),
        "train_loss": result.training_loss,
        "rss_peak_mib": rss_hwm_mib(),
        "rss_before_train_mib": rss_before_train,
        "batches": batches[: len(timer.turn_s)],  # the loader collates one batch ahead
    }
    turns.done(last=True)
    turns.released()
    return figures


WORKERS = {"setup": worker_setup, "peak": worker_peak, "arm": worker_arm}
