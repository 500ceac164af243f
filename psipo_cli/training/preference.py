"""`PsipoTrainer`: TRL's DPOTrainer with psipo's objectives, through public hooks and the few private ones
listed in `trl_internals.py`.

TRL keeps data preparation, the collator contract, DeepSpeed/FSDP handling and the training loop. psipo
replaces `compute_loss` (the loss step), `compute_ref_log_probs` (the reference pass), `prediction_step` and `log`
(metrics), precomputes the reference itself (`reference.py`, cached by what determines it), and wraps the private
`_prepare_dataset` only to skip its add-EOS step. The loss math lives in `psipo_cli.objectives`; the batch layout
in a `ForwardStep`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, ClassVar

import torch
from torch import Tensor
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from psipo_cli.data.chat import ENDS_MARKED
from psipo_cli.errors import UserError
from psipo_cli.models.loading import (
    attach_adapter,
    disable_base_dropout,
    load_base_model,
    use_adapter,
)
from psipo_cli.objectives import margin, pair_losses
from psipo_cli.recipe.schema import ObjectiveSection
from psipo_cli.training.arguments import trainer_arguments
from psipo_cli.training.distributed import prepare_zero3_init
from psipo_cli.training.forward import ConcatenatedForward, ForwardStep, aggregate
from psipo_cli.training.inputs import Prepared
from psipo_cli.training.layout_check import CheckedForward, forward_step_for
from psipo_cli.training.reference import reference_keys, reference_model, with_reference
from psipo_cli.training.token_budget import PackedTraining


class PsipoTrainer(PackedTraining, DPOTrainer):
    """DPO, IPO or ΨPO on LoRA/QLoRA policies, chosen by `objective.loss`; packed runs batch by tokens
    (`PackedTraining`)."""

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "psipo"]

    def __init__(self, *args: Any, objective: ObjectiveSection, forward_step: ForwardStep | None = None, **kwargs: Any):
        # Set before DPOTrainer.__init__, which may already run a forward step.
        self.objective = objective
        self.forward_step = forward_step or ConcatenatedForward()
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        """TRL's tokenisation, without its add-EOS step: psipo's data already ends every response with its one
        end marker (see `psipo_cli.data.chat`), which for chat rows may be a turn marker that is not EOS."""
        tokenizer, self._tokenizer = self._tokenizer, ENDS_MARKED
        try:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        finally:
            self._tokenizer = tokenizer

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "p_hat" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "p_hat"]

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """Disable the adapter (or switch to the frozen "ref" copy of a starting adapter) for the reference pass."""
        if self.ref_model is not None:
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def precompute_reference(self, keys: dict[str, str]) -> dict[str, bool]:
        """Add the reference log-prob columns to the train (and eval) data; {split: read from psipo's cache}."""
        self.precompute_ref_logps = True  # TRL reads it: a dataset passed to evaluate() is precomputed too
        model, hits = reference_model(self), {}
        batch = self.args.per_device_train_batch_size
        self.train_dataset, hits["train"] = with_reference(self, model, self.train_dataset, keys["train"], batch)
        if self.eval_dataset is not None:
            batch = self.args.per_device_eval_batch_size
            self.eval_dataset, hits["eval"] = with_reference(self, model, self.eval_dataset, keys["eval"], batch)
        return hits

    def check_layout(self) -> None:
        """Run the prefix-sharing self-check on the first training batch now, so the banner can report it.

        Under DeepSpeed the model only runs inside the engine that `train()` builds: the check then runs on first use.
        """
        step = self.forward_step
        if not isinstance(step, CheckedForward) or step.verdict is not None or self.is_deepspeed_enabled:
            return
        size = min(self.args.per_device_train_batch_size, len(self.train_dataset))
        batch = self._prepare_inputs(self.data_collator([self.train_dataset[i] for i in range(size)]))
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            step.check(self.model, batch)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed reference log-probs (B,), (B,) of chosen and rejected."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
            self.accelerator.autocast(),
        ):
            ref = self.forward_step(self.ref_model or model, inputs)
        return ref.chosen, ref.rejected

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        policy = self.forward_step(model, inputs, router_aux=self.aux_loss_enabled)
        if "ref_chosen_logps" in inputs:  # precomputed once (reference.py) through compute_ref_log_probs
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
        logps = aggregate(policy, ref_chosen, ref_rejected, self.objective.logps)
        h = margin(*logps)  # (B,)
        losses, target = pair_losses(
            self.objective.loss,
            h,
            self.objective.tau,
            p_hat=inputs.get("p_hat"),
            psi=self.objective.psi,
            label_eps=self.objective.label_eps,
        )
        loss = self.step_loss(losses, num_items_in_batch)
        if policy.router_aux_loss is not None:  # MoE load balancing, as TRL's DPOTrainer adds it
            loss = loss + policy.router_aux_loss
        self._record(h, target, logps, inputs, losses, policy.router_aux_loss)
        return (loss, {"margin": h.detach()}) if return_outputs else loss

    def _record(
        self,
        h: Tensor,
        target: Tensor | None,
        logps: tuple[Tensor, ...],
        inputs: dict[str, Tensor],
        losses: Tensor,
        router_aux_loss: Tensor | None = None,
    ) -> None:
        """Append this batch's per-pair metrics from all processes for the next `log`.

        TRL's `log` averages each list: with one value per pair that is the mean over pairs, so a short last batch
        weighs by its size, as in `psipo eval`. `gather_pairs` (token_budget.py) collects them from every process.
        """
        mode = "train" if self.model.training else "eval"
        pi_c, pi_r, ref_c, ref_r = (x.detach() for x in logps)
        values = {
            "margin": h.detach(),
            "reward_accuracy": (h.detach() > 0).float(),
            "logps_chosen": pi_c,
            "logps_rejected": pi_r,
            "logratio_chosen": pi_c - ref_c,  # drift from the reference, a KL proxy
            "logratio_rejected": pi_r - ref_r,
        }
        if target is not None:
            values["target"] = target.detach()
        if mode == "eval":
            # Transformers' eval_loss repeats each batch's mean loss eval_batch_size times and gather_for_metrics
            # trims the last batch to the remainder: right in one process, but across processes a short last
            # batch's mean includes the pairs the sampler repeated to even it out. TRL's log puts this per-pair
            # mean in its place. The train loss stays the Trainer's (averaged over steps and accumulation).
            values["loss"] = losses.detach()
        # One gather (and one device sync) for all per-pair metrics: a (pairs, metrics) table.
        table = self.gather_pairs(torch.stack([value.float() for value in values.values()], dim=1), mode)
        for key, column in zip(values, table.T.tolist(), strict=True):
            self._metrics[mode][key].extend(column)
        if router_aux_loss is not None:
            aux = self.gather_pairs(router_aux_loss.detach().float().reshape(1), mode)
            self._metrics[mode]["router_aux_loss"].extend(aux.tolist())
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(self.forward_step.count_tokens(inputs).reshape(1))
            self._tokens_since_log += int(tokens.sum().item())
            if self._last_log_time is None:
                self._last_log_time = time.perf_counter()

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now = time.perf_counter()
        if self.model.training and self._last_log_time is not None and self._tokens_since_log:
            logs["tokens_per_s"] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            self._tokens_since_log, self._last_log_time = 0, now
        elif "eval_runtime" in logs and self._last_log_time is not None:
            self._last_log_time += logs["eval_runtime"]  # evaluation time is not training time
        super().log(logs, start_time)


def build_preference_trainer(prepared: Prepared, model: Any = None) -> PsipoTrainer:
    """The preference stage's trainer (DPO, IPO, ΨPO), its layout self-checked and, if the recipe asks, its reference
    precomputed; `model` (e.g. a reloaded PeftModel) replaces loading the recipe's."""
    recipe, tokenizer = prepared.recipe, prepared.tokenizer
    # The arguments come first: under ZeRO-3 they hold the DeepSpeed config that zero.Init reads while the
    # model is being built, so the weights are sharded as they load.
    args = trainer_arguments(
        DPOConfig,
        recipe,
        prepared.eval is not None,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,  # psipo precomputes after the trainer is built (reference.py)
        beta=recipe.objective.tau,  # unused by psipo's loss; kept so TRL's model card states τ
    )
    prepare_zero3_init(args)
    peft_config = None
    if model is None:
        model, peft_config = attach_adapter(load_base_model(recipe), recipe.adapter)
    forward = forward_step_for(recipe.training.prefix_sharing, tokenizer.pad_token_id, recipe.training.pack_tokens)
    trainer = PsipoTrainer(
        model=model,
        args=args,
        data_collator=forward.collator(tokenizer.pad_token_id, recipe.data.max_length),
        train_dataset=prepared.train.dataset,
        eval_dataset=prepared.eval.dataset if prepared.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        objective=recipe.objective,
        forward_step=forward,
    )
    disable_base_dropout(trainer.model)
    if isinstance(forward, CheckedForward):
        _require_prompt_tokens(trainer.train_dataset, trainer.eval_dataset)
    if recipe.objective.precompute_ref_log_probs:  # runs the self-check on its first batch
        splits = {"train": prepared.train, "eval": prepared.eval}
        fingerprints = {name: data.fingerprint for name, data in splits.items() if data}
        trainer.reference_cache_hits = trainer.precompute_reference(reference_keys(recipe, tokenizer, fingerprints))
    return trainer


def _require_prompt_tokens(*datasets: Any) -> None:
    """A shared row forks the rejected branch off the prompt's last token: a pair whose prompt tokenises to nothing
    (TRL's prompt/response split can give that when they merge into one token) has none to fork from."""
    import pyarrow.compute as pc

    for dataset in (d for d in datasets if d is not None):
        lengths = pc.list_value_length(dataset.data.column("prompt_ids"))
        empty = len(dataset) - pc.count(pc.filter(lengths, pc.greater(lengths, 0))).as_py()
        if empty:
            raise UserError(
                f"{empty} pair(s) have a prompt that tokenises to nothing, which prefix sharing cannot fork from; "
                "set training.prefix_sharing: false",
                where="training.prefix_sharing",
            )
