"""Bradley–Terry reward model (eq. 4–5) and the soft labels it writes for ΨPO (`psipo label`).

The reward model is the recipe's base model with a scalar head (`AutoModelForSequenceClassification`,
one label) and a LoRA adapter; the head is trained in full (`modules_to_save`). TRL's RewardTrainer does the
data preparation and the loop; psipo replaces its loss step so the loss comes from `objectives`.
p̂ = σ(r(x, y_w) − r(x, y_l)) is the paper's first RLHF assumption made explicit: a ΨPO recipe can then
train on the labelled file with `data.columns.label`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftModel
from torch import Tensor
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference as RewardCollator
from trl.trainer.reward_trainer import suppress_seqcls_warning

from psipo_cli.data.pairs import PreferenceData
from psipo_cli.errors import UserError
from psipo_cli.models.loading import disable_base_dropout, load_base_model, lora_config
from psipo_cli.objectives import bradley_terry_loss
from psipo_cli.recipe.schema import AdapterSection, Recipe
from psipo_cli.run.directory import require_trained, resolve_run
from psipo_cli.training.arguments import trainer_arguments
from psipo_cli.training.distributed import prepare_zero3_init
from psipo_cli.training.forward import per_pair_floats
from psipo_cli.training.inputs import Prepared

LABEL_FLOOR = 1e-6  # p̂ is kept strictly inside (0, 1), so a logit Ψ downstream never sees ±∞


@dataclass
class SoftLabelRewardCollator(RewardCollator):
    """TRL's reward collator (chosen rows, then rejected rows), also passing p̂ when the data has it."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {**super().torch_call(examples), **per_pair_floats(examples, ("p_hat",))}


class PsipoRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with the loss step from `objectives.bradley_terry_loss` and psipo's metric names."""

    _tag_names: ClassVar[list[str]] = ["trl", "reward-trainer", "psipo"]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "p_hat" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "p_hat"]

    def compute_loss(
        self, model: Any, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        r_chosen, r_rejected = outputs.logits.squeeze(-1).float().chunk(2)  # (B,), (B,)
        loss = bradley_terry_loss(r_chosen, r_rejected, inputs.get("p_hat")).mean()
        mode = "train" if self.model.training else "eval"
        margin = (r_chosen - r_rejected).detach()
        values = {
            "margin": margin,
            "reward_accuracy": (margin > 0).float(),
            "reward_chosen": r_chosen.detach(),
            "reward_rejected": r_rejected.detach(),
        }
        for key, value in values.items():
            # One value per pair, as PsipoTrainer records them: TRL's log then averages over pairs, not batches.
            self._metrics[mode][key].extend(self.accelerator.gather_for_metrics(value).float().tolist())
        return (loss, outputs) if return_outputs else loss


def reward_lora_config(adapter: AdapterSection) -> LoraConfig:
    # The new scalar head trains in full and is saved with the adapter.
    return lora_config(adapter, "SEQ_CLS", modules_to_save=["score"])


def prepare_reward_data(prepared: Prepared) -> Prepared:
    """The reward stage's data step: pairs tokenised and cut to max_length here, as `psipo label` cuts them."""
    length = prepared.recipe.data.max_length
    train = tokenize_pairs(prepared.train, prepared.tokenizer, length)
    evaluation = prepared.eval and tokenize_pairs(prepared.eval, prepared.tokenizer, length)
    return dataclasses.replace(prepared, train=train, eval=evaluation)


def build_reward_trainer(prepared: Prepared, model: Any = None) -> PsipoRewardTrainer:
    """The reward stage's trainer; `model` (e.g. a reloaded PeftModel) replaces loading the recipe's."""
    recipe, tokenizer = prepared.recipe, prepared.tokenizer
    if recipe.adapter.init_from is not None:
        raise UserError("a reward model starts from the base model, not from an adapter", where="adapter.init_from")
    args = trainer_arguments(RewardConfig, recipe, prepared.eval is not None)  # before the model: see ZeRO-3
    prepare_zero3_init(args)
    peft_config = None
    if model is None:
        model = load_reward_base(recipe)
        peft_config = reward_lora_config(recipe.adapter)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    trainer = PsipoRewardTrainer(
        model=model,
        args=args,
        data_collator=SoftLabelRewardCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=prepared.train.dataset,
        eval_dataset=prepared.eval.dataset if prepared.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    disable_base_dropout(trainer.model)
    return trainer


def load_reward_base(recipe: Recipe) -> Any:
    """The base model with a fresh scalar head; the causal LM head it drops and the new head are expected."""
    with suppress_seqcls_warning():
        return load_base_model(recipe, AutoModelForSequenceClassification, num_labels=1)


def resolve_reward_run(target: Path) -> tuple[Recipe, Path]:
    """A trained reward-model run: a run directory, or a recipe whose output.dir is one."""
    recipe, run_dir = resolve_run(target, finished=False)
    if recipe.objective.loss != "reward":
        raise UserError(
            f"this run trained objective.loss={recipe.objective.loss}, not a reward model "
            "(a recipe with objective.loss: reward)",
            where=str(target),
        )
    require_trained(run_dir)
    return recipe, run_dir


def load_reward_model(recipe: Recipe, run_dir: Path, tokenizer: Any) -> PeftModel:
    """The trained reward model of a run: base + scalar head + adapter, in eval mode."""
    base = load_reward_base(recipe)
    base.config.pad_token_id = tokenizer.pad_token_id
    return PeftModel.from_pretrained(base, str(run_dir)).eval()


def reward_ids(tokenizer: Any, prompt: str, response: str, max_length: int | None = None) -> tuple[list[int], bool]:
    """(the tokens the reward model scores for prompt + response, whether max_length cut them).

    As TRL's reward data preparation (EOS appended to plain text, then the tokenizer's own call), then cut to the
    first `max_length` tokens, as DPO cuts pairs (keep_start). Training and `psipo label` both use this, so a label
    comes from exactly what the model saw in training. TRL's own rule, dropping longer pairs, would leave rows
    without a label.
    """
    text = prompt + response
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    ids = tokenizer(text, verbose=False)["input_ids"]  # verbose: no warning for texts longer than the model
    return ids[:max_length], max_length is not None and len(ids) > max_length


def pair_ids(row: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
    """chosen_ids/rejected_ids of a plain-text pair for the reward model, and whether either was cut."""
    chosen, cut_chosen = reward_ids(tokenizer, row["prompt"], row["chosen"], max_length)
    rejected, cut_rejected = reward_ids(tokenizer, row["prompt"], row["rejected"], max_length)
    return {"chosen_ids": chosen, "rejected_ids": rejected, "truncated": cut_chosen or cut_rejected}


def tokenize_pairs(data: PreferenceData, tokenizer: Any, max_length: int) -> PreferenceData:
    """The pairs tokenised and cut for the reward trainer, with the number cut. Given `chosen_ids`/`rejected_ids`,
    TRL skips its own tokenisation, and its max_length filter finds nothing to drop."""
    from psipo_cli.data.pairs import main_processes_first

    with main_processes_first():  # one process writes the map's cache beside the shared dataset
        dataset = data.dataset.map(pair_ids, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length})
    cut = sum(dataset["truncated"])
    return dataclasses.replace(data, dataset=dataset.remove_columns("truncated"), truncated=cut)


@torch.no_grad()
def score_ids(model: Any, pad_token_id: int, ids: list[list[int]], batch_size: int = 32) -> list[float]:
    """r(x, y) for each token sequence (from `reward_ids`), in right-padded batches."""
    device = next(model.parameters()).device
    rewards: list[float] = []
    for start in range(0, len(ids), batch_size):
        batch = [torch.tensor(i) for i in ids[start : start + batch_size]]
        input_ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad_token_id)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in batch], batch_first=True)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (b, 1)
        rewards += logits[:, 0].float().cpu().tolist()
    return rewards


def score(
    model: Any, tokenizer: Any, texts: list[tuple[str, str]], batch_size: int = 32, max_length: int | None = None
) -> list[float]:
    """r(x, y) for each (prompt, response), cut to `max_length` tokens as in training."""
    ids = [reward_ids(tokenizer, prompt, response, max_length)[0] for prompt, response in texts]
    return score_ids(model, tokenizer.pad_token_id, ids, batch_size)


def preference_probability(r_chosen: float, r_rejected: float) -> float:
    """p̂ = σ(r_w − r_l) (eq. 4), kept inside [LABEL_FLOOR, 1 − LABEL_FLOOR]."""
    p_hat = 1.0 / (1.0 + math.exp(-max(min(r_chosen - r_rejected, 50.0), -50.0)))
    return min(max(p_hat, LABEL_FLOOR), 1.0 - LABEL_FLOOR)
