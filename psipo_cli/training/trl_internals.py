"""Every TRL/transformers internal psipo relies on, in one table, checked against the installed versions.

psipo subclasses TRL's DPOTrainer and RewardTrainer. Most of what it overrides is public (compute_loss,
compute_ref_log_probs, prediction_step, log), but some of what it needs has no public API: underscore names,
contracts of a monkey-patched forward, trainer state TRL reads. Those move between releases without notice, so they
are listed here (`HOOKS`: where each lives, the name, what psipo uses it for, why no public API serves) and
`check()` verifies each one when the training package is first imported: a missing hook is one line naming it and
the installed and tested versions, at start, not a traceback mid-run.

Replaced by public APIs (no longer in the table for psipo's training code). TRL's
`disable_gradient_checkpointing` stays: transformers' switches are deprecated in 5.x, and re-enabling them from
psipo would not restore exactly the settings the Trainer chose (e.g. reentrant under PEFT + ZeRO-3).
- `trl.trainer.utils.use_adapter` → `psipo_cli.models.loading.use_adapter` (peft's `disable_adapter`,
  `active_adapter`, `set_adapter`);
- `trl.trainer.utils.global_then_local_main_first` → `psipo_cli.data.pairs.main_processes_first` (accelerate's
  `PartialState.main_process_first` and `local_main_process_first`).

A hook is checked by one of these kinds:
- `attribute`: `where` (an importable dotted path) has `name`;
- `parameters`: the callable `where` takes the comma-separated parameters `name`;
- `names`: the code of `where` (a function, or a property's getter) names `name`, as an attribute or a string;
- `self_reads`: the method `where` reads `name`, and nothing else, from `self`;
- `fused_forward`: a model patched by `where` (TRL's add_fused_lm_head) takes the keyword arguments `name`.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import types
from typing import Any

from psipo_cli.errors import UserError
from psipo_cli.training.hook import Hook
from psipo_cli.training.trl_rloo_hooks import RLOO_HOOKS

DPO = "trl.trainer.dpo_trainer.DPOTrainer"
REWARD = "trl.trainer.reward_trainer.RewardTrainer"

HOOKS: tuple[Hook, ...] = (
    Hook(
        DPO + "._prepare_dataset",
        "dataset, processing_class, args, dataset_name",
        "parameters",
        "training/preference.py, tools/evaluate.py",
        "overridden to run TRL's tokenisation without its add-EOS step; called unbound by `psipo eval` to tokenise "
        "pairs exactly as training does",
        "TRL has no option to skip add-EOS and no public tokenisation function",
    ),
    Hook(
        DPO + "._prepare_dataset",
        "_tokenizer",
        "self_reads",
        "training/preference.py, tools/evaluate.py",
        "swapped for `data.chat.ENDS_MARKED` around _prepare_dataset, so add-EOS finds every response ended; "
        "`psipo eval` passes a stand-in trainer holding only this",
        "the add-EOS step reads the EOS token from this private attribute, not from processing_class",
    ),
    Hook(
        DPO + "._set_signature_columns_if_needed",
        "_signature_columns",
        "names",
        "training/preference.py",
        "extended so the p_hat column survives remove_unused_columns",
        "remove_unused_columns=False would keep every text column; no public way to add one column",
    ),
    Hook(
        REWARD + "._set_signature_columns_if_needed",
        "_signature_columns",
        "names",
        "training/reward.py",
        "extended so the p_hat column survives remove_unused_columns",
        "as for DPOTrainer",
    ),
    Hook(
        DPO + ".__init__",
        "_metrics",
        "names",
        "training/preference.py",
        "per-pair metrics appended to TRL's store, which its log() averages",
        "TRL's metric store is private; there is no public add-metric API",
    ),
    Hook(
        REWARD + ".__init__",
        "_metrics",
        "names",
        "training/reward.py",
        "reward metrics appended to TRL's store, which its log() averages",
        "as for DPOTrainer",
    ),
    Hook(
        "transformers.Trainer",
        "_prepare_inputs",
        "attribute",
        "training/preference.py",
        "moves a hand-collated batch to the device (the layout self-check, prediction_step)",
        "the Trainer exposes its device placement only through this private method",
    ),
    Hook(
        DPO + ".__init__",
        "_tag_names",
        "names",
        "training/preference.py",
        "the model's hub tags (psipo added to TRL's), overridden as a class attribute",
        "TRL reads the tags from this private class attribute; no argument sets them",
    ),
    Hook(
        REWARD + ".__init__",
        "_tag_names",
        "names",
        "training/reward.py",
        "the reward model's hub tags, as for DPOTrainer",
        "as for DPOTrainer",
    ),
    Hook(
        DPO + ".__init__",
        "aux_loss_enabled",
        "names",
        "training/preference.py",
        "the policy pass adds the MoE router loss exactly when TRL would",
        "trainer state, undocumented",
    ),
    Hook(
        DPO + ".evaluate",
        "precompute_ref_logps",
        "names",
        "training/preference.py",
        "set after psipo's own reference precompute, so evaluate() on a passed dataset precomputes it too",
        "trainer state, undocumented",
    ),
    Hook(
        "trl.trainer.dpo_trainer.DataCollatorForPreference.torch_call",
        "ref_chosen_logps",
        "names",
        "training/forward.py, training/preference.py",
        "precomputed reference log-probs reach compute_loss through TRL's collator",
        "the collator's pass-through columns are undocumented",
    ),
    Hook(
        DPO + ".__init__",
        "add_fused_lm_head",
        "names",
        "training/forward.py",
        "DPOTrainer patches the policy (and a ref model) with the fused LM head the forward steps call",
        "which model TRL patches, and when, is internal",
    ),
    Hook(
        "trl.trainer.utils.add_fused_lm_head",
        "fused_lm_head, labels, shift_labels",
        "fused_forward",
        "training/forward.py, tools/evaluate.py",
        "model(..., fused_lm_head=True, labels= or shift_labels=) returns per-token log-probs without (B, L, V) "
        "logits; shift_labels scores the prefix-shared row's own next tokens",
        "a monkey-patched forward's keyword contract, not a stable API",
    ),
    Hook(
        "trl.trainer.utils.FusedCausalLMOutput",
        "log_probs",
        "attribute",
        "training/forward.py",
        "per-token log-probs of the fused head",
        "output type of the patched forward",
    ),
    Hook(
        "trl.trainer.utils.FusedCausalLMOutput",
        "aux_loss",
        "attribute",
        "training/forward.py",
        "the MoE load-balancing loss of the fused head",
        "output type of the patched forward",
    ),
    Hook(
        "trl.trainer.dpo_trainer",
        "DataCollatorForPreference",
        "attribute",
        "training/forward.py",
        "subclassed (PreferenceCollator) to pass p_hat; its batch layout is what ConcatenatedForward reads",
        "not exported from trl; the batch layout is TRL's",
    ),
    Hook(
        "trl.trainer.reward_trainer",
        "DataCollatorForPreference",
        "attribute",
        "training/reward.py",
        "subclassed (SoftLabelRewardCollator) to pass p_hat",
        "not exported from trl",
    ),
    Hook(
        "trl.trainer.reward_trainer",
        "suppress_seqcls_warning",
        "attribute",
        "training/reward.py",
        "quiets the expected missing/unexpected keys when a causal LM gets a scalar head",
        "TRL-internal context manager; transformers offers no per-call switch",
    ),
    Hook(
        "trl.models.utils",
        "disable_gradient_checkpointing",
        "attribute",
        "training/preference.py",
        "gradient checkpointing off for the no-grad reference pass and self-check, restored as the Trainer set it",
        "transformers' own switches are deprecated in 5.x and would not restore the Trainer's exact settings",
    ),
    Hook(
        "trl.models",
        "prepare_deepspeed",
        "attribute",
        "training/reference.py",
        "a DeepSpeed inference engine for the reference precompute before train()",
        "exported but undocumented; accelerate prepares a model only for training",
    ),
    Hook(
        "trl.trainer.dpo_trainer.DPOTrainer",
        "_precompute_ref_logps",
        "attribute",
        "bench/bench.py",
        "timed by the benchmark (TRL's own reference precompute)",
        "private method",
    ),
    Hook(
        "transformers.PretrainedConfig",
        "_attn_implementation",
        "attribute",
        "models/masks.py",
        "which attention kernel a model runs, to build the prefix-shared mask in the form that kernel reads",
        "transformers has a public setter (set_attn_implementation) but no public getter",
    ),
    Hook(
        "transformers.PretrainedConfig._attn_implementation",
        "_attn_implementation_internal",
        "names",
        "tests/test_layout_check.py",
        "a test sets a hub-kernel name directly, without registering a kernel",
        "the storage behind the property above",
    ),
    Hook(
        "transformers.Trainer._get_dataloader",
        "BatchRebalanceSampler",
        "names",
        "training/token_budget.py",
        "packed runs return a BatchRebalanceSampler subclass from _get_train_sampler: the Trainer then passes it as "
        "the batch sampler and keeps accelerate from sharding it a second time",
        "the Trainer takes a custom batch sampler only through this type check; overriding get_train_dataloader "
        "would copy its column removal, worker seeding and accelerate preparation",
    ),
    Hook(
        "transformers.Trainer._get_train_sampler",
        "train_dataset",
        "parameters",
        "training/token_budget.py",
        "overridden to plan packed batches by tokens",
        "the Trainer's sampler choice has no public hook",
    ),
    Hook(
        "transformers.Trainer._run_epoch",
        "epoch",
        "parameters",
        "training/token_budget.py",
        "overridden to set the packed batches' epoch, however deep the resumed loader wraps the sampler",
        "the Trainer reaches a batch sampler's set_epoch only two wrappers deep, and has no epoch hook before it "
        "iterates (on_epoch_begin has no epoch number)",
    ),
    Hook(
        "transformers.Trainer._get_num_items_in_batch",
        "batch_samples, device",
        "parameters",
        "training/token_budget.py",
        "overridden to count a packed step's pairs over its micro-batches and processes, passed to compute_loss",
        "the only place the Trainer sees all of a step's micro-batches before the first backward",
    ),
    Hook(
        "transformers.Trainer._run_epoch",
        "current_gradient_accumulation_steps",
        "names",
        "training/token_budget.py",
        "a packed micro-batch's loss is multiplied by the step's micro-batch count, which the Trainer divides by",
        "the Trainer keeps the count of a step's micro-batches (fewer at an epoch's end) only in this attribute",
    ),
    *RLOO_HOOKS,  # the sampling stages' (rlhf, online_psipo), in their own table
)


def resolve(path: str) -> Any:
    """The object at an importable dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module {parts[0]}")


def _code(obj: Any) -> types.CodeType:
    obj = obj.fget if isinstance(obj, property) else obj
    return inspect.unwrap(obj).__code__


def _all_code(code: types.CodeType) -> list[types.CodeType]:
    """`code` and the code of the functions nested in it."""
    nested = [const for const in code.co_consts if isinstance(const, types.CodeType)]
    return [code, *(inner for child in nested for inner in _all_code(child))]


def code_names(obj: Any) -> set[str]:
    """Attribute and global names, and string constants, in the code of `obj` and its nested functions."""
    found: set[str] = set()
    for code in _all_code(_code(obj)):
        # A dict display's keys are one tuple constant: {"old_logps": ...} names "old_logps" too.
        consts = [c for const in code.co_consts for c in (const if isinstance(const, tuple) else (const,))]
        found |= set(code.co_names) | {const for const in consts if isinstance(const, str)}
    return found


def self_reads(method: Any) -> set[str]:
    """Attributes the method reads or sets on its first argument (`self`), nested functions included."""
    code = _code(method)
    me = code.co_varnames[0]
    found: set[str] = set()
    for inner in _all_code(code):
        previous = None
        for instruction in dis.get_instructions(inner):
            on_self = (
                previous is not None
                and previous.argval == me
                and previous.opname.startswith(("LOAD_FAST", "LOAD_DEREF"))
                and instruction.opname in ("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR")
            )
            if on_self:
                found.add(instruction.argval)
            previous = instruction
    return found


def _fused_forward_parameters(add_fused_lm_head: Any) -> set[str]:
    """Keyword parameters of a forward patched by `add_fused_lm_head`, on a stand-in model (no weights)."""
    from transformers import PretrainedConfig

    class Probe:
        config = PretrainedConfig()

        def forward(self, *args: Any, **kwargs: Any) -> None:
            return None

    probe = Probe()
    add_fused_lm_head(probe)
    return set(inspect.signature(probe.forward, follow_wrapped=False).parameters)


def missing(hook: Hook) -> str | None:
    """Why `hook` does not hold on the installed versions, or None if it does."""
    try:
        target = resolve(hook.where)
    except Exception:  # a missing module or name, or a library that fails to import at all
        return f"{hook.where} not found"
    wanted = [name.strip() for name in hook.name.split(",")]
    try:
        if hook.kind == "attribute":
            lacking = [name for name in wanted if not hasattr(target, name)]
        elif hook.kind == "parameters":
            present = list(inspect.signature(target).parameters)
            lacking = [name for name in wanted if name not in present]
        elif hook.kind == "names":
            lacking = sorted(set(wanted) - code_names(target))
        elif hook.kind == "self_reads":
            reads = self_reads(target)
            if set(wanted) != reads:
                return f"{hook.where} reads {sorted(reads)} from self, not {wanted}"
            lacking = []
        elif hook.kind == "fused_forward":
            lacking = sorted(set(wanted) - _fused_forward_parameters(target))
        else:
            raise ValueError(f"unknown hook kind {hook.kind}")
    except (TypeError, ValueError, AttributeError) as err:
        return f"{hook.where}: cannot inspect ({err})"
    return f"{hook.where}: {', '.join(lacking)} missing" if lacking else None


def problems() -> list[str]:
    """What does not hold, each once (several hooks can live on one missing name)."""
    return list(dict.fromkeys(problem for hook in HOOKS if (problem := missing(hook)) is not None))


_verified = False


def check() -> None:
    """Raise a one-line `UserError` naming the hooks the installed TRL/transformers lack; once per process."""
    global _verified
    if _verified:
        return
    found = problems()
    if found:
        from psipo_cli.versions import constraints_path, describe_versions

        raise UserError(
            f"the installed TRL/transformers lack internals psipo relies on ({'; '.join(found)}); installed "
            f"{describe_versions()}; install the tested versions with `pip install -c {constraints_path()} psipo` "
            "(a checkout: make install)"
        )
    _verified = True
