"""Reference log-probs computed once before training, cached by what determines them and nothing else.

The key is the base model's identity (name, revision, and for a local directory the size and modification time of
its files, so a model retrained in place is noticed; no parameter is hashed, so ZeRO-3's partitioned weights do not
matter and a 7B model costs no hashing pass), the starting adapter if any, how the weights are loaded (dtype,
quantisation, attention kernel), the tokenizer and chat template, the pairs' content, max_length and truncation,
the mixed precision the pass runs under, and the code that computes it (a cache version and the library versions).
Learning rate, τ, seed, output directory and the rest of the recipe do not change the reference, so a τ sweep
computes it once. (TRL's own cache key hashes a dataset fingerprint that includes every training argument, and the
policy's parameters, which differ with the seed and are empty under ZeRO-3.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from datasets.fingerprint import Hasher

from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.directory import library_versions
from psipo_cli.run.fingerprint import model_identity

CACHE_FOLDER = "psipo-reference"
# Bumped whenever how the reference log-probs are computed changes (tokenisation, forward step), so old caches
# are not served after an upgrade; the library versions are in the key for the same reason.
CACHE_VERSION = 1
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return Hasher.hash((vocab, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token))


def reference_keys(recipe: Recipe, tokenizer: Any, pairs_fingerprints: dict[str, str]) -> dict[str, str]:
    """The cache key of each split's reference log-probs, {split: key} (see the module docstring for what is in
    them). What the splits share (model files, tokenizer) is identified once."""
    spec = recipe.model
    shared = Hasher.hash(
        {
            "model": model_identity(spec.name_or_path, spec.revision),
            "loading": (spec.dtype, spec.quantization, spec.quant_type, spec.double_quant, spec.attn_implementation),
            "adapter": model_identity(recipe.adapter.init_from, None) if recipe.adapter.init_from else None,
            "tokenizer": tokenizer_identity(tokenizer),
            "max_length": recipe.data.max_length,
            "truncation": "keep_start",
            "precision": "bf16" if recipe.training.bf16 else "fp16" if recipe.training.fp16 else "fp32",  # autocast
            "code": (CACHE_VERSION, library_versions()),
        }
    )
    return {split: Hasher.hash((shared, pairs)) for split, pairs in pairs_fingerprints.items()}


def cache_path(key: str) -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / CACHE_FOLDER / f"{key}.json"


def reference_model(trainer: Any) -> Any:
    """The model to run the reference pass with before training (the adapter is switched off per batch)."""
    from trl.models import prepare_deepspeed

    if trainer.is_deepspeed_enabled:  # before train(): parameters still on CPU (ZeRO-2) or sharded (ZeRO-3)
        return prepare_deepspeed(trainer.model, trainer.accelerator)
    return trainer.model


def with_reference(trainer: Any, model: Any, dataset: Dataset, key: str, batch_size: int) -> tuple[Dataset, bool]:
    """`dataset` with the reference log-prob columns added, and whether they came from the cache.

    The main process decides whether the cache has them and tells the others, so all take the same path (a file
    appearing between two processes' looks would otherwise split the collectives). On a miss every process
    computes its share and gathers all values; the main process writes the file (by rename: whole or absent). On
    a hit the main process reads it and sends the values, so nodes whose cache directory is not shared agree.
    """
    accelerator = trainer.accelerator
    path = cache_path(broadcast_object_list([key], from_process=0)[0])
    hit = broadcast_object_list([path.is_file()], from_process=0)[0]
    if hit:
        read = json.loads(path.read_text(encoding="utf-8")) if accelerator.is_main_process else None
        values = broadcast_object_list([read], from_process=0)[0]
    else:
        values = _compute(trainer, model, dataset, batch_size)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(values), encoding="utf-8")
            os.replace(tmp, path)
    for column in COLUMNS:
        dataset = dataset.add_column(column, values[column])
    return dataset, hit


def _compute(trainer: Any, model: Any, dataset: Dataset, batch_size: int) -> dict[str, list[float]]:
    from torch.utils.data import DataLoader

    loader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    )
    chosen, rejected = [], []
    for batch in loader:
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
        ref_chosen, ref_rejected = trainer.accelerator.gather_for_metrics((ref_chosen, ref_rejected))
        chosen.append(ref_chosen.float().cpu())
        rejected.append(ref_rejected.float().cpu())
    return {COLUMNS[0]: torch.cat(chosen).tolist(), COLUMNS[1]: torch.cat(rejected).tolist()}
