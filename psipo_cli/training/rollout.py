"""What the sampling stages (rlhf, online_psipo) share: the reward model, the policy, and TRL's RLOO settings.

Both build on TRL's RLOOTrainer, which samples `rollout.responses_per_prompt` responses per prompt from the
current policy, scores them with reward functions and keeps the sampled batch for `rollout.iterations` passes.
psipo's reward function is the trained Bradley–Terry model of a `psipo finetune` reward run, scoring the text as
it was trained and labels on (`reward.reward_ids`: prompt + response, EOS appended, cut to its max_length). TRL's
own reward-model path decodes responses without special tokens, dropping a chat response's end-of-turn marker
that the reward model's training pairs carried, and does not cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import send_to_device
from trl import RLOOConfig

from psipo_cli.data.chat import stop_token_ids
from psipo_cli.errors import UserError
from psipo_cli.models.loading import attach_adapter, disable_base_dropout, load_base_model, load_tokenizer
from psipo_cli.recipe.schema import Recipe
from psipo_cli.training.arguments import trainer_arguments
from psipo_cli.training.distributed import prepare_zero3_init
from psipo_cli.training.inputs import Prepared
from psipo_cli.training.reward import load_reward_model, resolve_reward_run, reward_ids, score_ids


def reward_run(recipe: Recipe, tokenizer: Any) -> tuple[Recipe, Path]:
    """(recipe, directory) of the rollout's reward model, refused with one line unless it is a trained psipo reward
    run on the policy's base model and tokenizer (the responses it scores are the policy's tokens, as text)."""
    assert recipe.rollout is not None  # the schema requires it for the sampling stages
    where = "rollout.reward_model"
    try:
        reward_recipe, run_dir = resolve_reward_run(Path(recipe.rollout.reward_model))
    except UserError as err:
        raise UserError(str(err), where=where) from None
    theirs = reward_recipe.model
    reward_tokenizer = load_tokenizer(theirs)
    same = (
        reward_tokenizer.get_vocab() == tokenizer.get_vocab()
        and reward_tokenizer.eos_token == tokenizer.eos_token
        and getattr(reward_tokenizer, "chat_template", None) == getattr(tokenizer, "chat_template", None)
    )
    if not same:  # TRL's sampler hands the reward function the policy's tokens
        raise UserError("the reward model's tokenizer differs from the policy's (vocabulary, EOS or template)", where)
    if reward_recipe.data.max_length < recipe.data.max_length:
        raise UserError(
            f"the reward model was trained on data.max_length={reward_recipe.data.max_length} tokens; a prompt and "
            f"response here may take {recipe.data.max_length}, and would be scored cut",
            where=where,
        )
    if (recipe.model.name_or_path, recipe.model.revision) != (theirs.name_or_path, theirs.revision):
        raise UserError(
            f"the reward model was trained on {theirs.name_or_path}, the policy is {recipe.model.name_or_path}; "
            "the sampling stages take one base model for both",
            where=where,
        )
    return reward_recipe, run_dir


def prepare_rollout(prepared: Prepared) -> Prepared:
    """The sampling stages' data step: the reward run is checked here, before anything is loaded or written."""
    reward_run(prepared.recipe, prepared.tokenizer)
    return prepared


class RewardModelScore:
    """TRL reward function: r(x, y) of each sampled response from a psipo reward run, frozen, in eval mode."""

    __name__ = "reward_model"  # TRL names the logged reward after it: rewards/reward_model/mean

    def __init__(self, recipe: Recipe, tokenizer: Any, device: torch.device) -> None:
        reward_recipe, run_dir = reward_run(recipe, tokenizer)
        self.model = load_reward_model(reward_recipe, run_dir, tokenizer)
        if reward_recipe.model.quantization == "none":  # bitsandbytes placed a quantised one while loading
            self.model.to(device)
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = reward_recipe.data.max_length  # what it was trained on; longer texts are cut as there

    def __call__(self, prompts: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        # The response as its tokens decode, special tokens kept: a chat response's end-of-turn marker is scored,
        # as in the reward model's training pairs.
        responses = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=False)
        ids = [reward_ids(self.tokenizer, p, r, self.max_length)[0] for p, r in zip(prompts, responses, strict=True)]
        return score_ids(self.model, self.tokenizer.pad_token_id, ids)


class ResumableSamples:
    """Mixin for TRL's RLOOTrainer: a checkpoint keeps the batch of samples still in use, so a resumed run trains
    on exactly what an uninterrupted one would.

    With rollout.iterations > 1 (or gradient accumulation) one batch of samples serves several steps. RLOOTrainer
    holds it in memory only, with a micro-step counter starting at 0, so a run resumed from a checkpoint inside
    such a block samples afresh where the uninterrupted run reused its batch. The batch and the counter are saved
    beside each process's RNG state and restored with it (both per process: each holds its own samples).
    """

    accelerator: Any
    _buffered_inputs: Any
    _step: int

    def _samples_file(self, checkpoint: str) -> Path:
        return Path(checkpoint) / f"samples_{self.accelerator.process_index}.pt"

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # type: ignore[misc]
        torch.save({"step": self._step, "batch": self._buffered_inputs}, self._samples_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)  # type: ignore[misc]
        if checkpoint is None:
            return
        if not self._samples_file(checkpoint).is_file():
            # Resuming without it would sample afresh on this process only, and the processes' collectives part.
            raise UserError(
                f"has no {self._samples_file(checkpoint).name}: resume from an earlier checkpoint", checkpoint
            )
        # Loaded to the CPU first: under DeepSpeed on CPU the device is "cpu:0", a location torch.load cannot map to.
        saved = torch.load(self._samples_file(checkpoint), weights_only=True, map_location="cpu")
        self._step, self._buffered_inputs = saved["step"], send_to_device(saved["batch"], self.accelerator.device)


def rollout_arguments(recipe: Recipe, has_eval: bool, **stage_specific: Any) -> RLOOConfig:
    """RLOOConfig from the recipe: batch sizes count prompts in the recipe, responses in TRL."""
    rollout = recipe.rollout
    assert rollout is not None
    k = rollout.responses_per_prompt
    return trainer_arguments(
        RLOOConfig,
        recipe,
        has_eval,
        num_generations=k,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        num_iterations=rollout.iterations,
        per_device_train_batch_size=recipe.training.per_device_train_batch_size * k,
        per_device_eval_batch_size=recipe.training.per_device_eval_batch_size * k,
        **stage_specific,
    )


def load_rollout_policy(recipe: Recipe, tokenizer: Any, model: Any = None) -> tuple[Any, Any]:
    """(model, LoRA config or None): the recipe's, loaded as the preference stages load it, unless `model` is given;
    either way sampling stops where a response ends, at EOS and at the chat template's end-of-turn token."""
    peft_config = None
    if model is None:
        model, peft_config = attach_adapter(load_base_model(recipe), recipe.adapter)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    return model, peft_config


def build_sampling_trainer(
    trainer_class: type, prepared: Prepared, model: Any, arguments: dict[str, Any], **trainer_kwargs: Any
) -> Any:
    """A sampling stage's trainer (`trainer_class`, an RLOOTrainer): `arguments` are its RLOOConfig settings beyond
    the recipe's; `model` (e.g. a reloaded PeftModel) replaces loading the recipe's."""
    recipe, tokenizer = prepared.recipe, prepared.tokenizer
    # Before the arguments: under ZeRO-3 they switch on zero.Init, which would shard the frozen reward model too.
    reward = RewardModelScore(recipe, tokenizer, PartialState().device)
    args = rollout_arguments(recipe, prepared.eval is not None, **arguments)
    prepare_zero3_init(args)
    model, peft_config = load_rollout_policy(recipe, tokenizer, model)
    trainer = trainer_class(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=prepared.train.dataset,
        eval_dataset=prepared.eval.dataset if prepared.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        **trainer_kwargs,
    )
    disable_base_dropout(trainer.model)
    return trainer
