"""`psipo eval --generate`: sample from the policy and from its reference to estimate KL(π‖π_ref) and KL(π_ref‖π).

Sampling is plain ancestral sampling from each policy (every logits processor neutralised), seeded with the
recipe's seed, and every sample is scored under both policies by the trainer's forward step (`scoring`). A run of
a sampling stage (rlhf, online_psipo) also has each sample scored by its reward model, as training scored them.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from psipo_cli.data.chat import stop_token_ids, up_to_stop
from psipo_cli.models.loading import ReferenceContext
from psipo_cli.recipe.schema import Recipe
from psipo_cli.tools.scoring import model_device, score_responses, trained_precision

# (prompt text, its token ids): the text is what a reward model scores, the ids what the policy continues.
Prompt = tuple[str, list[int]]
# A reward model as the sampling stages call it: (prompt texts, response token ids) -> r(x, y) of each response.
RewardFn = Callable[[list[str], list[list[int]]], list[float]]


def unique_prompts(dataset: Any, limit: int) -> list[Prompt]:
    """The first `limit` distinct prompts of tokenised pairs, as text and ids (chat-rendered as in training)."""
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for text, ids in zip(dataset["prompt"], dataset["prompt_ids"], strict=True):
        if text not in seen:
            seen.add(text)
            prompts.append((text, ids))
        if len(prompts) == limit:
            break
    return prompts


def tokenize_prompts(texts: list[str], tokenizer: Any, limit: int) -> list[Prompt]:
    """The first `limit` of already distinct, rendered prompt texts with their ids, tokenised as TRL's sampler
    tokenises a text prompt (special tokens added: the renderer left BOS to the tokenizer)."""
    return [(text, tokenizer(text)["input_ids"]) for text in texts[:limit]]


def sampling_config(tokenizer: Any, max_new_tokens: int) -> Any:
    """Plain ancestral sampling from π: every logits processor a model's generation_config may set is neutralised.

    transformers fills any field left unset from the model's generation_config and then from its own defaults
    (top_k=50): the KL estimate needs samples from π itself, so each is given explicitly.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )


def sample_responses(
    model: Any, prompts: list[list[int]], per_prompt: int, config: Any, max_rows: int = 256
) -> list[list[list[int]]]:
    """`per_prompt` responses to each prompt (token ids up to and including the first stop token), from `model` as
    it is. Prompts of one token length are sampled together, at most `max_rows` rows a batch: no row is padded, so
    every response is drawn from the same distribution as when each prompt is sampled on its own (not the same
    draws: the random stream differs).
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    per_batch = max(1, max_rows // per_prompt)
    batches = [
        (n, group[i : i + per_batch]) for n, group in sorted(by_length.items()) for i in range(0, len(group), per_batch)
    ]
    out: list[list[list[int]]] = [[] for _ in prompts]
    for length, indices in batches:
        ids = torch.tensor([prompts[i] for i in indices], device=model_device(model)).repeat_interleave(per_prompt, 0)
        rows = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        responses = [up_to_stop(row, config.eos_token_id) for row in rows[:, length:].tolist()]
        for k, index in enumerate(indices):
            out[index] = responses[k * per_prompt : (k + 1) * per_prompt]
    return out


@dataclass
class Samples:
    """What one policy's samples gave: response lengths, whether each ended in EOS, log π(y|x) − log π_ref(y|x), and
    each one's reward when a reward model scored them."""

    lengths: list[int]
    ended: list[bool]
    log_ratios: list[float]
    rewards: list[float]


@dataclass
class Sampler:
    """What sampling from a run needs: the policy (and its reference context), the run and its reward model."""

    model: Any
    reference: ReferenceContext
    tokenizer: Any
    recipe: Recipe
    reward: RewardFn | None = None  # the sampling stages' reward model (rollout.reward_model); None: no rewards


def _sample(
    sampler: Sampler, from_reference: bool, prompts: list[Prompt], per_prompt: int, max_new_tokens: int
) -> Samples:
    """`per_prompt` samples per prompt from π (or π_ref), each scored under both (and by the reward model)."""
    model, reference, tokenizer, recipe = sampler.model, sampler.reference, sampler.tokenizer, sampler.recipe
    config = sampling_config(tokenizer, max_new_tokens)
    stop_ids = config.eos_token_id
    samples = Samples([], [], [], [])
    with reference() if from_reference else contextlib.nullcontext(), trained_precision(model, recipe):
        groups = sample_responses(model, [ids for _, ids in prompts], per_prompt, config)
    for (text, prompt), responses in zip(prompts, groups, strict=True):
        logp, logp_ref = score_responses(model, reference, prompt, responses, recipe, tokenizer.pad_token_id)
        samples.lengths += [len(r) for r in responses]
        samples.ended += [bool(r) and r[-1] in stop_ids for r in responses]
        samples.log_ratios += (logp - logp_ref).tolist()
        if sampler.reward is not None:
            samples.rewards += sampler.reward([text] * len(responses), responses)
    return samples


@torch.no_grad()
def sample_and_score(sampler: Sampler, prompts: list[Prompt], per_prompt: int, max_new_tokens: int) -> dict[str, Any]:
    """`per_prompt` samples per prompt from π and from π_ref; KL(π‖π_ref) ≈ mean over π's samples of
    log π(y|x) − log π_ref(y|x).

    Log-probs are summed over each sample's tokens up to and including its first EOS. The reverse KL(π_ref‖π) is
    estimated from the reference's samples the same way. Both are unbiased Monte Carlo estimates of non-negative
    quantities, so either can come out slightly below 0 when the two policies are close. With a reward model, the
    mean reward of each policy's samples too, and for rlhf eq. 6's objective E[r] − τ·KL(π‖π_ref) (sampled at
    temperature 1, whatever rollout.temperature the run trained with).
    """
    from transformers import set_seed

    recipe = sampler.recipe
    set_seed(recipe.training.seed)  # the same samples on every rerun
    policy = _sample(sampler, False, prompts, per_prompt, max_new_tokens)
    ref = _sample(sampler, True, prompts, per_prompt, max_new_tokens)
    kl = statistics.fmean(policy.log_ratios)
    summary = {
        "prompts": len(prompts),
        "samples_per_prompt": per_prompt,
        "max_new_tokens": max_new_tokens,
        "seed": recipe.training.seed,
        "kl_policy_reference": kl,
        "kl_reference_policy": -statistics.fmean(ref.log_ratios),
        "policy_length_mean": statistics.fmean(policy.lengths),
        "policy_length_median": statistics.median(policy.lengths),
        "policy_ended_with_eos": statistics.fmean(policy.ended),
        "reference_length_mean": statistics.fmean(ref.lengths),
        "reference_length_median": statistics.median(ref.lengths),
        "reference_ended_with_eos": statistics.fmean(ref.ended),
    }
    if sampler.reward is not None and recipe.rollout is not None:
        summary |= {
            "reward_model": recipe.rollout.reward_model,
            "reward_policy": statistics.fmean(policy.rewards),
            "reward_reference": statistics.fmean(ref.rewards),
        }
        if recipe.objective.loss == "rlhf":
            summary["rlhf_objective"] = summary["reward_policy"] - recipe.objective.tau * kl
    return summary
