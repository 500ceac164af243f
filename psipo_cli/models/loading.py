"""Load the tokenizer, the base model (optionally 4/8-bit through bitsandbytes) and the LoRA adapter.

The reference policy is never a second copy of the weights: it is this same model with the adapter
disabled, or, when training starts from an existing adapter, a frozen copy of that adapter (TRL names it
"ref"), so the reference is the model you started from rather than the bare base.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from psipo_cli.errors import UserError
from psipo_cli.recipe.loader import looks_local
from psipo_cli.recipe.schema import AdapterSection, ModelSection, Recipe

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_ADAPTER = "ref"  # the starting adapter's name beside the trained one: TRL's name for it in training

# A context in which a finished run's policy is its reference policy (see `load_reference`).
ReferenceContext = Callable[[], contextlib.AbstractContextManager]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_kwargs(model: ModelSection) -> dict[str, Any]:
    # The hub token is never put here: huggingface_hub reads HF_TOKEN or the login cache itself.
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def load_tokenizer(model: ModelSection) -> Any:
    """The base model's tokenizer, with a pad token (EOS if it has none, as TRL does)."""
    if looks_local(model.name_or_path) and not Path(model.name_or_path).is_dir():
        raise UserError(f"model directory {model.name_or_path} not found", where="model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, **_hub_kwargs(model))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer ({_first_line(err)})", where="model.name_or_path") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(model: ModelSection) -> BitsAndBytesConfig | None:
    if model.quantization == "none":
        return None
    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if model.dtype in ("auto", "bfloat16") else DTYPES[model.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.quant_type,
        bnb_4bit_use_double_quant=model.double_quant,
        bnb_4bit_compute_dtype=compute,
        # ZeRO-3 shards parameters by dtype: packed 4-bit weights must be stored in the compute dtype to shard.
        bnb_4bit_quant_storage=compute,
    )


def load_base_model(recipe: Recipe, auto_class: Any = AutoModelForCausalLM, **extra: Any) -> PreTrainedModel:
    """The base model as the recipe describes it (a causal LM unless `auto_class` says otherwise), prepared for
    k-bit training when quantised."""
    spec = recipe.model
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype], **_hub_kwargs(spec), **extra}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if (quant := quantization_config(spec)) is not None:
        kwargs["quantization_config"] = quant
    try:
        model = auto_class.from_pretrained(spec.name_or_path, **kwargs)
    except ImportError as err:
        raise UserError(f"missing package for this model ({_first_line(err)})", where="model.quantization") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model ({_first_line(err)})", where="model.name_or_path") from None
    if quant is not None:
        # Casts norms to fp32 and enables input gradients; the Trainer sets the checkpointing variant later.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.gradient_checkpointing
        )
        # Here, not in each command: the trainer's evaluations run the same 4-bit layers in eval mode as generation.
        keep_generic_4bit_kernel_where_needed(model)
    return model


def keep_generic_4bit_kernel_where_needed(model: Any) -> None:
    """Work around bitsandbytes 0.50 on CPU: on the first eval-mode forward it repacks each 4-bit weight for its
    AVX512 inference kernel, and the repacking fails for layers whose sizes are not multiples of its blocks (e.g.
    the tiny model's 96 inputs against 64-wide quantisation blocks). Those layers keep the generic kernel."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        rows, cols = state.shape
        if cols % state.blocksize or rows % 32:  # the packer's 32-row blocks (bitsandbytes.functional)
            module.support_avx512bf16_for_cpu = False


def lora_config(adapter: AdapterSection, task_type: str = "CAUSAL_LM", **extra: Any) -> LoraConfig:
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type=task_type,
        **extra,
    )


def attach_adapter(model: PreTrainedModel, adapter: AdapterSection) -> tuple[Any, LoraConfig | None]:
    """(model, peft_config for TRL). A starting adapter is loaded trainable here; a new one is made by TRL."""
    if adapter.init_from is None:
        return model, lora_config(adapter)
    path = Path(adapter.init_from)
    if not (path / "adapter_config.json").is_file():
        raise UserError("no adapter_config.json there; expected a saved LoRA adapter", where="adapter.init_from")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=True), None
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load adapter ({_first_line(err)})", where="adapter.init_from") from None


def disable_base_dropout(model: Any) -> None:
    """Zero every dropout except the trained adapter's own (`adapter.dropout`).

    The base model's dropout would make the policy and the adapter-off reference differ at random, and a frozen
    "ref" adapter copy must be deterministic too; TRL's `disable_dropout` zeroes everything, LoRA's dropout included.
    """
    active = getattr(model, "active_adapter", None)
    keep = f"lora_dropout.{active}" if isinstance(active, str) else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and not (keep and name.endswith(keep)):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # functional dropout in attention
            module.attention_dropout = 0.0


@contextlib.contextmanager
def use_adapter(model: PeftModel, adapter_name: str | None) -> Iterator[None]:
    """Run with the adapter `adapter_name` active, or with every adapter off when None; restored after.

    peft's public API; replaces TRL's private `trl.trainer.utils.use_adapter` (see training/trl_internals.py).
    """
    if adapter_name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def load_policy(recipe: Recipe, run_dir: Path) -> Any:
    """A finished run's policy for inference: the recipe's base model with the run's trained adapter, eval mode.

    `load_reference` gives the run's reference policy from the same weights.
    """
    try:
        model = PeftModel.from_pretrained(load_base_model(recipe), str(run_dir))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load the run's adapter ({_first_line(err)})", where=str(run_dir)) from None
    return model.eval()


def load_reference(model: Any, recipe: Recipe) -> ReferenceContext:
    """A context in which `model`, the run's policy from `load_policy`, is the run's reference policy.

    The reference is the base with the adapter disabled, or, for a run started from an adapter
    (`adapter.init_from`), that starting adapter, loaded here beside the trained one (what TRL's frozen "ref" copy
    held during training): one set of base weights, no copy. Outside the context the trained adapter is active.
    """
    adapter = None
    if recipe.adapter.init_from:
        try:
            model.load_adapter(str(Path(recipe.adapter.init_from)), adapter_name=REFERENCE_ADAPTER)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(
                f"cannot load the starting adapter ({_first_line(err)})", where="adapter.init_from"
            ) from None
        model.set_adapter("default")  # the trained adapter stays the model's own; the context switches to "ref"
        adapter = REFERENCE_ADAPTER
    # TRL's own switch, as its trainer uses: None disables the adapters, a name activates that adapter meanwhile.
    return lambda: use_adapter(model, adapter)


@contextlib.contextmanager
def quiet_loading(run_dir: Path) -> Iterator[None]:
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


def inference_device() -> torch.device:
    """Where label, generate, chat and eval run a model: the GPU when there is one (training leaves it to the
    Trainer)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_inference_device(model: Any, spec: ModelSection) -> Any:
    """`model` on `inference_device()`. A quantised model is left where bitsandbytes put it while loading (the
    GPU when there is one): its packed weights are not moved with `.to`."""
    if spec.quantization == "none":
        model.to(inference_device())
    return model


def describe_reference(recipe: Recipe) -> str:
    """One line saying which policy the margins (and, for rlhf, eq. 6's KL) are measured against."""
    if recipe.objective.loss == "reward":
        return "none: a reward model is fitted to the pairs directly (Bradley–Terry, eq. 5)"
    if recipe.adapter.init_from:
        ref = f"frozen copy of the starting adapter {recipe.adapter.init_from}"
    else:
        ref = f"base model {recipe.model.name_or_path} with the adapter disabled"
    if recipe.rollout is not None:  # the sampling stages: new responses each step, scored under π_ref as drawn
        when = "computed on each batch of sampled responses"
    elif recipe.objective.precompute_ref_log_probs:
        when = "precomputed once before training"
    else:
        when = "computed every step"
    return f"{ref} ({when})"
