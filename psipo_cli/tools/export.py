"""Ship a finished run: merge its adapter into a plain transformers model, generate and chat with it, write its
model card, and push it to the Hugging Face Hub.

Every entry point takes a run directory (or the recipe whose output.dir it is) and opens it with
`rundir.resolve_run`. Hub tokens are never handled here: huggingface_hub reads `HF_TOKEN` or its login cache
itself, so no token can end up in the card or in any file psipo writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from psipo_cli.data.chat import ChatRenderer
from psipo_cli.errors import UserError
from psipo_cli.models.loading import describe_reference, load_policy, load_tokenizer, to_inference_device
from psipo_cli.recipe.loader import looks_local
from psipo_cli.recipe.schema import ObjectiveSection, Recipe
from psipo_cli.run.directory import (
    SUMMARY_FILE,
    check_writable,
    library_versions,
    read_metrics,
    resolve_run,
    write_atomic,
)

MERGE_DTYPES = ("float32", "bfloat16", "float16")
CARD_FILE = "README.md"
REFERENCE_ADAPTER = "reference"

# ---------------------------------------------------------------------------------------------------------------
# psipo merge
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MergeReport:
    out: Path
    parameters: int
    dtype: str
    auto_class: str
    dequantised: str | None  # the run's quantisation ('4bit'/'8bit') when its base was reloaded unquantised


def merge_run(target: Path, out: Path, overwrite: bool = False, dtype: str | None = None) -> MergeReport:
    """Merge a run's adapter into its base model and save a standalone transformers model (safetensors) and the
    tokenizer to `out`; `AutoModelForCausalLM.from_pretrained(out)` then needs no peft.

    A QLoRA run (model.quantization 4bit/8bit) is merged into the base loaded *unquantised*, in the recipe's dtype
    (float32 when that is 'auto' on a machine without CUDA), instead of through bitsandbytes: the adapter's update
    is added to the full-precision base weights, not to their 4/8-bit rounding, so the merged model is close to but
    not bit-identical with the quantised model plus adapter it was trained as. (Merging into quantised weights would
    re-quantise them after adding the update and round most of it away.)

    `dtype` casts the merged model (the base is loaded in it). A reward-model run merges into a sequence classifier
    (`AutoModelForSequenceClassification`). The model is written to a temporary sibling of `out` and renamed, so
    `out` is never half-written.
    """
    out = out.expanduser().resolve()
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(MERGE_DTYPES)}", where="--dtype")
    _check_merge_target(out, overwrite)
    recipe, run_dir = resolve_run(target)
    if run_dir.resolve().is_relative_to(out):
        raise UserError(f"would replace the run {run_dir} itself; choose another directory", where=f"--out {out}")
    merged, tokenizer = _merged_model(recipe, run_dir, dtype)
    _replace_dir(out, lambda tmp: _save_model(merged, tokenizer, tmp))
    return MergeReport(
        out=out,
        parameters=sum(p.numel() for p in merged.parameters()),
        dtype=str(merged.dtype).removeprefix("torch."),
        auto_class="AutoModelForSequenceClassification" if _is_reward(recipe) else "AutoModelForCausalLM",
        dequantised=None if recipe.model.quantization == "none" else recipe.model.quantization,
    )


def _check_merge_target(out: Path, overwrite: bool) -> None:
    """Fail before loading anything if `out` is unusable or holds something we were not told to replace."""
    where = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UserError("exists and is a file", where=where)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError("exists and is not empty; pass --overwrite to replace it", where=where)
        if not (out / "config.json").is_file():
            raise UserError(
                "is not empty and holds no saved model (no config.json); refusing to delete it", where=where
            )
    check_writable(out.parent, where)  # the model is written to a sibling of out, then renamed


def merge_dtype(recipe: Recipe, requested: str | None) -> str:
    """The dtype the base is loaded in for merging: --dtype, else the recipe's; 'auto' on a quantised run means the
    checkpoint's dtype on GPU and float32 on CPU (the run computed in bf16, which CPUs do slowly and coarsely)."""
    if requested is not None:
        return requested
    if recipe.model.dtype == "auto" and recipe.model.quantization != "none" and not torch.cuda.is_available():
        return "float32"
    return recipe.model.dtype


def _is_reward(recipe: Recipe) -> bool:
    return recipe.objective.loss == "reward"


def _merged_model(recipe: Recipe, run_dir: Path, dtype: str | None) -> tuple[Any, Any]:
    """(merged model, tokenizer): the run's base loaded unquantised in `merge_dtype`, adapter applied and merged."""
    from psipo_cli.training.reward import load_reward_model

    plain = recipe.model.model_copy(update={"quantization": "none", "dtype": merge_dtype(recipe, dtype)})
    unquantised = recipe.model_copy(update={"model": plain})
    tokenizer = load_tokenizer(recipe.model)
    with _loading(run_dir):
        if _is_reward(recipe):
            model = load_reward_model(unquantised, run_dir, tokenizer)
        else:
            model = load_policy(unquantised, run_dir)
    return model.merge_and_unload(), tokenizer


@contextlib.contextmanager
def _loading(run_dir: Path) -> Iterator[None]:
    """Load quietly (no progress bars, no deprecation notices from inside the libraries), and report a damaged
    adapter file as the run's problem rather than with a traceback."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    except SafetensorError as err:
        raise UserError(f"the run's adapter weights are unreadable ({err})", where=str(run_dir)) from None


def _save_model(model: Any, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory))  # safetensors: transformers' only format since v5
    tokenizer.save_pretrained(str(directory))


def _replace_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a fresh sibling of `out`, then rename it to `out` (replacing what was there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed merge with the same pid
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():  # --overwrite, checked before anything was loaded
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# psipo generate / psipo chat
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0: greedy decoding
    seed: int | None = None  # set once before the first prompt, so a whole session is reproducible


class Generator:
    """A finished run's policy, or with `reference=True` its reference policy, answering conversations.

    The reference is the base with the adapter disabled, or, for a run started from an existing adapter
    (`adapter.init_from`), that starting adapter: the model the run's margins were measured against.
    """

    def __init__(self, target: Path, reference: bool = False, raw: bool = False) -> None:
        self.recipe, self.run_dir = resolve_run(target)
        if _is_reward(self.recipe):
            raise UserError(
                "a reward model scores text, it does not generate; use `psipo label` with it", where=str(target)
            )
        self.tokenizer = load_tokenizer(self.recipe.model)
        self.reference = reference
        self.use_template = not raw and getattr(self.tokenizer, "chat_template", None) is not None
        self._strip_bos = ChatRenderer(self.tokenizer).strip
        with _loading(self.run_dir):
            self.model = to_inference_device(load_policy(self.recipe, self.run_dir), self.recipe.model)
            if reference and self.recipe.adapter.init_from:
                self.model.load_adapter(self.recipe.adapter.init_from, adapter_name=REFERENCE_ADAPTER)
                self.model.set_adapter(REFERENCE_ADAPTER)

    @property
    def context_length(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        return min(limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**9) if any(limits) else 2048

    def describe(self) -> str:
        who = "reference policy" if self.reference else "trained policy"
        ref = describe_reference(self.recipe).split(" (")[0]
        what = f" = {ref}" if self.reference else f" (adapter in {self.run_dir})"
        mode = "chat template" if self.use_template else "plain text"
        return f"{who}{what}; prompts as {mode}"

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text the model continues: the chat template with a generation prompt, or the turns joined."""
        if not self.use_template:
            return "\n".join(message["content"] for message in messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # As in training (chat.ChatRenderer): the tokenizer adds BOS itself, so a BOS written by the template goes.
        return text[len(self._strip_bos) :] if self._strip_bos and text.startswith(self._strip_bos) else text

    def room(self, max_new_tokens: int) -> int:
        """Most prompt tokens that fit in the context beside `max_new_tokens` new ones."""
        room = self.context_length - max_new_tokens
        if room < 1:
            raise UserError(
                f"leaves no room for the prompt in the model's {self.context_length}-token context",
                where=f"--max-new-tokens {max_new_tokens}",
            )
        return room

    def encode(self, messages: list[dict[str, str]], max_new_tokens: int) -> torch.Tensor:
        """Token ids (1, n) of the conversation; the oldest exchanges, then the oldest tokens, go if it is too long."""
        room = self.room(max_new_tokens)
        ids = self.tokenizer(self.render(messages), return_tensors="pt")["input_ids"]
        while ids.shape[1] > room and len(messages) > 2:
            messages = messages[2:]  # drop the oldest user/assistant exchange
            ids = self.tokenizer(self.render(messages), return_tensors="pt")["input_ids"]
        return ids[:, -room:]

    def reply(self, messages: list[dict[str, str]], sampling: Sampling) -> str:
        return self.replies([messages], sampling)[0]

    @torch.no_grad()
    def replies(self, conversations: list[list[dict[str, str]]], sampling: Sampling) -> list[str]:
        """One reply to each conversation, generated together: prompts left-padded so every reply starts at the
        same position."""
        encoded = [self.encode(messages, sampling.max_new_tokens)[0] for messages in conversations]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.stack([torch.nn.functional.pad(i, (width - len(i), 0), value=pad) for i in encoded])
        mask = torch.stack([torch.arange(width) >= width - len(i) for i in encoded]).long()
        sample = sampling.temperature > 0
        options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": sampling.max_new_tokens}
        if sample:
            options["temperature"] = sampling.temperature
        with self._active():
            out = self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                pad_token_id=pad,
                **options,
            )
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def _active(self) -> contextlib.AbstractContextManager[Any]:
        if self.reference and not self.recipe.adapter.init_from:
            return self.model.disable_adapter()
        return contextlib.nullcontext()


def open_generator(target: Path, sampling: Sampling, reference: bool = False, raw: bool = False) -> Generator:
    """A Generator, with `sampling` checked against its context before anything is generated."""
    generator = Generator(target, reference, raw)
    generator.room(sampling.max_new_tokens)
    return generator


def seed_sampling(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


def generate_completions(
    generator: Generator, prompts: list[str], sampling: Sampling, batch_size: int = 16
) -> list[str]:
    """One completion per prompt, each prompt a single user turn, `batch_size` prompts per generate call."""
    seed_sampling(sampling.seed)
    turns = [[{"role": "user", "content": prompt}] for prompt in prompts]
    batches = (turns[start : start + batch_size] for start in range(0, len(turns), batch_size))
    return [reply for batch in batches for reply in generator.replies(batch, sampling)]


def chat_loop(
    generator: Generator, read_line: Callable[[], str | None], write: Callable[[str], None], sampling: Sampling
) -> int:
    """Answer lines until EOF (`read_line` returns None) or '/exit'; '/reset' forgets the conversation so far.

    Each reply is written as one `assistant> ...` block. Returns the number of replies.
    """
    seed_sampling(sampling.seed)
    history: list[dict[str, str]] = []
    replies = 0
    while (line := read_line()) is not None:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = generator.reply(history, sampling)
        history.append({"role": "assistant", "content": answer})
        write(f"assistant> {answer}")
        replies += 1
    return replies


def stdin_reader() -> Callable[[], str | None]:
    """Lines from stdin: with a `you> ` prompt (and line editing) at a terminal, plain lines from a pipe."""
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        try:
            return input("you> ") if interactive else _readline()
        except EOFError:
            return None

    return read


def _readline() -> str | None:
    line = sys.stdin.readline()
    return line if line else None


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------

_LOSS_TEXT = {
    "dpo": "DPO: per-pair loss −log σ(τh) (Azar et al. 2023, eq. 9), which keeps pushing h up on hard labels",
    "ipo": "IPO: per-pair loss (h − 1/(2τ))² (Azar et al. 2023, eq. 28), which regresses every margin to "
    "1/(2τ) = {target:g}",
    "psipo": "ΨPO: per-pair loss (h − (Ψ(p̂) − Ψ(1 − p̂))/(2τ))² with Ψ = {psi}, which regresses each margin to "
    "a target set by its soft label p̂ (Azar et al. 2023, ΨPO with the IPO regression)",
}


def describe_objective(objective: ObjectiveSection) -> str:
    """A paragraph saying what was optimised, with τ, Ψ and the sequence log-prob aggregation."""
    if objective.loss == "reward":
        return (
            "A Bradley–Terry reward model: per-pair loss −log σ(r(x, y_w) − r(x, y_l)) (Azar et al. 2023, eq. 5), "
            "a scalar head on the base model; its p̂ = σ(r_w − r_l) labels pairs for ΨPO (`psipo label`)."
        )
    aggregation = {"mean": "token mean", "sum": "sum"}.get(objective.logps or "", str(objective.logps))
    loss = _LOSS_TEXT[objective.loss].format(target=1 / (2 * objective.tau), psi=objective.psi)
    return (
        f"{loss}; τ = {objective.tau:g}. Here h = log[π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))] is the log-ratio "
        f"margin of a pair (chosen y_w, rejected y_l) against the reference policy π_ref, with each sequence's "
        f"log-probability the {aggregation} of its response tokens' log-probs (`objective.logps: {objective.logps}`)."
    )


def _hub_datasets(recipe: Recipe) -> list[str]:
    sources = [recipe.data.train, recipe.data.eval]
    return sorted({s.path for s in sources if s is not None and not looks_local(s.path) and not Path(s.path).exists()})


def card_metadata(recipe: Recipe) -> dict[str, Any]:
    """The card's YAML front matter. No license: psipo cannot know it (it is the base model's and the data's)."""
    tags = ["psipo", "reward-model" if _is_reward(recipe) else recipe.objective.loss, "trl", "lora"]
    if recipe.model.quantization != "none":
        tags.append("qlora")
    meta: dict[str, Any] = {
        "base_model": recipe.model.name_or_path,
        "library_name": "peft",
        "pipeline_tag": "text-classification" if _is_reward(recipe) else "text-generation",
        "tags": tags,
    }
    if datasets := _hub_datasets(recipe):
        meta["datasets"] = datasets
    return meta


def _load_summary(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _final_metrics(run_dir: Path, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The last train and eval log lines: from the summary, else from metrics.jsonl."""
    finals = {split: summary.get(f"final_{split}") or {} for split in ("train", "eval")}
    for record in read_metrics(run_dir):
        split = record.get("split")
        if split in finals and not summary.get(f"final_{split}"):
            finals[split] = {k: v for k, v in record.items() if k != "split"}
    return finals


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_table(finals: dict[str, dict[str, Any]]) -> list[str]:
    keys = [k for k in dict.fromkeys([*finals["train"], *finals["eval"]]) if k not in ("epoch",)]
    if not keys:
        return ["No metrics were logged."]
    splits = [split for split in ("train", "eval") if finals[split]]
    heads = {"train": "train (last log)", "eval": "eval (held out, last)"}
    lines = ["| metric | " + " | ".join(heads[s] for s in splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(finals[s].get(key, "")) for s in splits) + " |")
    return lines


def _data_text(recipe: Recipe) -> str:
    columns = recipe.data.columns
    if columns.label:
        labels = f"soft labels p̂ from column `{columns.label}`"
    elif columns.votes_chosen:
        labels = f"soft labels p̂ = `{columns.votes_chosen}` / `{columns.votes_total}` (annotator votes)"
    elif columns.score_chosen:
        labels = f"soft labels p̂ = σ((`{columns.score_chosen}` − `{columns.score_rejected}`) / {columns.score_scale:g})"
    else:
        labels = "hard labels: chosen preferred"
    evaluation = f"; held out: `{recipe.data.eval.path}`" if recipe.data.eval else ""
    return f"`{recipe.data.train.path}` ({labels}){evaluation}"


def _dropped_text(dropped: Any) -> str:
    if not dropped:
        return ""
    return " (dropped: " + ", ".join(f"{count} {reason}" for reason, count in dropped.items()) + ")"


def _settings_table(recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    t, a, m = recipe.training, recipe.adapter, recipe.model
    steps = t.max_steps if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
    rows = [
        ("preference data", _data_text(recipe)),
        ("pairs trained on", f"{summary.get('train_pairs', '?')}{_dropped_text(summary.get('dropped_pairs'))}"),
        ("optimizer steps", f"{summary.get('steps', steps)} (in {summary.get('runtime_s', '?')} s)"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler_type} schedule, {t.warmup_steps:g} warm-up steps"),
        ("batch", f"{t.per_device_train_batch_size} pairs per device × {t.gradient_accumulation_steps} accumulation"),
        ("max length", f"{recipe.data.max_length} tokens"),
        ("LoRA", f"r = {a.r}, alpha = {a.alpha:g}, dropout = {a.dropout:g}, modules = {a.target_modules}"),
        ("base weights", f"{m.dtype}, quantisation {m.quantization}"),
        ("precision", "bf16" if t.bf16 else "fp16" if t.fp16 else "as the weights"),
        ("seed", str(t.seed)),
    ]
    if a.init_from:
        rows.insert(6, ("starting adapter", f"`{a.init_from}`"))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _usage(recipe: Recipe, run_dir: Path) -> list[str]:
    where = recipe.output.hub_model_id or str(run_dir)
    peft_class = "AutoPeftModelForSequenceClassification" if _is_reward(recipe) else "AutoPeftModelForCausalLM"
    plain_class = "AutoModelForSequenceClassification" if _is_reward(recipe) else "AutoModelForCausalLM"
    return [
        "With peft (the adapter on top of the base model, which peft downloads or reads from "
        "`base_model_name_or_path` in `adapter_config.json`):",
        "",
        "```python",
        f"from peft import {peft_class}",
        "from transformers import AutoTokenizer",
        "",
        f'model = {peft_class}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        "Or merge the adapter into the base weights for a plain transformers model that needs no peft:",
        "",
        "```",
        f"psipo merge {run_dir} --out merged/",
        "```",
        "",
        f'then `{plain_class}.from_pretrained("merged/")`. A QLoRA run merges into the base loaded unquantised.',
    ]


def model_card(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> str:
    """The text of the run's README.md: front matter, objective, settings, final metrics, reference, versions, use."""
    front = yaml.safe_dump(card_metadata(recipe), sort_keys=False, allow_unicode=True)
    title = recipe.output.hub_model_id or run_dir.name
    intro = f"{recipe.description}\n\n" if recipe.description else ""
    versions = summary.get("versions") or library_versions()
    lines = [
        f"---\n{front}---",
        "",
        f"# {title}",
        "",
        f"{intro}A LoRA adapter for `{recipe.model.name_or_path}` trained on preference pairs with psipo, which "
        "implements DPO, IPO and ΨPO (Azar et al. 2023, [arXiv 2310.12036](https://arxiv.org/abs/2310.12036)) on "
        "TRL's DPOTrainer.",
        "",
        "## Objective",
        "",
        describe_objective(recipe.objective),
        "",
        "## Reference policy",
        "",
        summary.get("reference") or describe_reference(recipe),
        "",
        "## Training",
        "",
        *_settings_table(recipe, summary),
        "",
        "## Final metrics",
        "",
        *_metrics_table(_final_metrics(run_dir, summary)),
        "",
        "## Versions",
        "",
        ", ".join(f"{name} {ver}" for name, ver in versions.items()),
        "",
        "## How to use it",
        "",
        *_usage(recipe, run_dir),
    ]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: Path, recipe: Recipe, summary: dict[str, Any] | None = None) -> Path:
    """Write README.md (the model card) into the run directory, replacing peft's generic one; returns its path."""
    path = run_dir / CARD_FILE
    write_atomic(path, model_card(run_dir, recipe, summary if summary is not None else _load_summary(run_dir)))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------------------------

# Not uploaded: checkpoints (optimizer state, large and only useful to resume), the pickled TrainingArguments
# (internal to the Trainer, and unsafe to unpickle from a download) and hidden/temporary files.
PUSH_IGNORE = ["checkpoint-*", "training_args.bin", ".*", "*/.*", "*.tmp"]


def files_to_push(run_dir: Path) -> list[str]:
    """The run's files (relative, sorted) that `push_run` uploads, by the same patterns upload_folder applies."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=PUSH_IGNORE))


def push_run(run_dir: Path, repo_id: str, private: bool = True) -> str:
    """Upload the run to the hub model repository `repo_id` (created private if missing); returns its URL.

    The token is whatever huggingface_hub finds (HF_TOKEN, then the login cache): psipo never reads or stores it.
    """
    from huggingface_hub import HfApi

    if not (run_dir / CARD_FILE).is_file():
        raise UserError("no model card (README.md) to push; finish the run first", where=str(run_dir))
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(run_dir),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=PUSH_IGNORE,
            commit_message=f"psipo run {run_dir.name}",
        )
    # Any failure: the hub client's error types change with its HTTP library (requests, httpx, httpx2), and whatever
    # went wrong (auth, network, offline mode, a bad repo id) the run itself is saved and the push can be retried.
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"push to {repo_id} failed ({first}); the run is saved in {run_dir}: retry with `psipo push {run_dir}`",
            where="output.hub_model_id",
        ) from None
    return str(url)


@dataclass
class Exports:
    card: Path
    pushed_to: str | None


def finish_run_exports(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> Exports:
    """End of a run (main process only): write the model card, and push the run when output.push_to_hub."""
    card = write_model_card(run_dir, recipe, summary)
    url = None
    if recipe.output.push_to_hub and recipe.output.hub_model_id:
        url = push_run(run_dir, recipe.output.hub_model_id)
    return Exports(card, url)


def push_finished_run(target: Path, repo_id: str | None = None, private: bool = True) -> str:
    """`psipo push`: (re)write the card naming the repository, then push; returns the repository URL."""
    recipe, run_dir = resolve_run(target)
    repo = repo_id or recipe.output.hub_model_id
    if not repo:
        raise UserError("no repository to push to: pass --repo-id or set output.hub_model_id", where="--repo-id")
    named = recipe.model_copy(update={"output": recipe.output.model_copy(update={"hub_model_id": repo})})
    write_model_card(run_dir, named)
    return push_run(run_dir, repo, private)
