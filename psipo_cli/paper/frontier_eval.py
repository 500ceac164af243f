"""Sampling for `psipo frontier`: the preference data drawn from π_ref, and every policy judged by the gold preference.

Sampling is plain ancestral sampling at temperature 1 (`tools.sampling.sampling_config`), so the mean of
log π(y|x) − log π_ref(y|x) over π's samples is an unbiased estimate of KL(π‖π_ref), and log-probs come from the
trainer's own forward step (`tools.scoring.score_responses`), as `psipo eval --generate` does.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from psipo_cli.data.chat import stop_token_ids
from psipo_cli.models.loading import ReferenceContext
from psipo_cli.paper.gold import Estimate, GoldReward, preference, votes_for_first, win_rate
from psipo_cli.recipe.schema import Recipe
from psipo_cli.tools.sampling import sample_responses, sampling_config
from psipo_cli.tools.scoring import score_responses

Responses = list[list[int]]  # token ids of one prompt's responses, each up to and including its stop token


@torch.no_grad()
def sample(
    model: Any, tokenizer: Any, prompts: list[list[int]], per_prompt: int, max_new_tokens: int, seed: int
) -> list[Responses]:
    """`per_prompt` responses to each prompt from `model` as it is (adapter on or off), seeded."""
    torch.manual_seed(seed)
    return sample_responses(model, prompts, per_prompt, sampling_config(tokenizer, max_new_tokens))


def response_texts(tokenizer: Any, responses: Responses) -> list[str]:
    """The texts of responses without their stop token, as a data file or the gold reward sees them."""
    stop = stop_token_ids(tokenizer)
    return [
        tokenizer.decode(ids[:-1] if ids and ids[-1] in stop else ids, skip_special_tokens=False) for ids in responses
    ]


@dataclass
class DataDraw:
    """Preference pairs drawn from π_ref: the hard file (one comparison per pair) and the soft one (many)."""

    hard: list[dict[str, Any]]
    soft: list[dict[str, Any]]
    identical: int  # prompts whose two samples were the same text: no preference to record, left out
    empty: int  # prompts with an empty sample (the policy stopped at once), left out


def preference_pairs(
    prompt_texts: list[str], responses: list[Responses], tokenizer: Any, gold: GoldReward, soft: int, seed: int
) -> DataDraw:
    """One pair per prompt from its two samples, labelled by annotators who each follow p* (Bradley–Terry).

    Hard rows have one annotator, so p̂ ∈ {0, 1} and the winner is `chosen`; soft rows have `soft` annotators and
    keep p̂ = votes / soft in `p_chosen`, the majority as `chosen`. Every row keeps p*(chosen ≻ rejected) too.
    """
    generator = torch.Generator().manual_seed(seed)
    draw = DataDraw([], [], 0, 0)
    for prompt, pair in zip(prompt_texts, responses, strict=True):
        a, b = response_texts(tokenizer, pair)
        if not a.strip() or not b.strip():
            draw.empty += 1
            continue
        if a == b:
            draw.identical += 1
            continue
        r_a, r_b = gold([a, b])
        p = preference(r_a, r_b)
        for rows, count in ((draw.hard, 1), (draw.soft, soft)):
            votes = votes_for_first(p, count, generator)
            first = 2 * votes >= count  # a tie (even count) keeps the sampled order at p̂ = ½
            chosen, rejected = (a, b) if first else (b, a)
            won = votes if first else count - votes
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "p_chosen": won / count,
                    "votes_chosen": won,
                    "votes_total": count,
                    "p_gold": p if first else 1 - p,
                }
            )
    return draw


@dataclass
class Judged:
    """A policy's samples on the evaluation prompts, judged: one value per prompt of each measure."""

    win_rate: list[float]  # mean p*(y ≻ y′), y ~ π, y′ ~ π_ref
    gold_reward: list[float]  # mean r*(y), y ~ π
    kl: list[float]  # mean log π(y|x) − log π_ref(y|x), y ~ π: KL(π‖π_ref) in nats per response
    length: float  # mean response tokens, stop token included
    empty: float  # share of responses with no text (r* = 0 by definition): a policy collapsing onto them shows here

    MEASURES = ("win_rate", "gold_reward", "kl")

    def as_dict(self, per_prompt: bool = False) -> dict[str, Any]:
        """Each measure's mean over prompts with its 95% interval (and, with `per_prompt`, the values themselves)."""
        out: dict[str, Any] = {}
        for key in self.MEASURES:
            values = getattr(self, key)
            out[key] = Estimate.of(values).as_dict() | ({"per_prompt": values} if per_prompt else {})
        return out | {"length": self.length, "empty": self.empty}


@dataclass
class Judge:
    """What judging a policy needs: the evaluation prompts, the reference's samples' gold rewards, the settings."""

    tokenizer: Any
    gold: GoldReward
    prompts: list[list[int]]
    reference_rewards: list[list[float]]  # per prompt, r* of π_ref's samples
    per_prompt: int
    max_new_tokens: int
    seed: int

    @torch.no_grad()
    def __call__(self, model: Any, reference: ReferenceContext, recipe: Recipe) -> Judged:
        responses = sample(model, self.tokenizer, self.prompts, self.per_prompt, self.max_new_tokens, self.seed)
        judged = Judged([], [], [], 0.0, 0.0)
        texts = [response_texts(self.tokenizer, group) for group in responses]
        for prompt, sampled, text, ref_rewards in zip(
            self.prompts, responses, texts, self.reference_rewards, strict=True
        ):
            r = self.gold(text)
            logp, logp_ref = score_responses(model, reference, prompt, sampled, recipe, self.tokenizer.pad_token_id)
            judged.win_rate.append(win_rate(r, ref_rewards))
            judged.gold_reward.append(statistics.fmean(r))
            judged.kl.append(float((logp - logp_ref).mean()))
        every = [t for group in texts for t in group]
        judged.length = statistics.fmean(len(ids) for group in responses for ids in group)
        judged.empty = sum(not t.strip() for t in every) / len(every)
        return judged

    @classmethod
    def for_reference(
        cls,
        model: Any,
        tokenizer: Any,
        gold: GoldReward,
        prompts: list[list[int]],
        per_prompt: int,
        max_new_tokens: int,
        seed: int,
        reference_seed: int,
    ) -> Judge:
        """A judge whose reference samples are drawn now from `model` (the base: π_ref) with `reference_seed`, another
        seed than the policies' samples, so that π_ref judged against itself is two independent draws."""
        drawn = sample(model, tokenizer, prompts, per_prompt, max_new_tokens, reference_seed)
        rewards = [gold(response_texts(tokenizer, group)) for group in drawn]
        return cls(tokenizer, gold, prompts, rewards, per_prompt, max_new_tokens, seed)
