"""The gold preference of `psipo frontier`: a frozen, seeded reward on any text, Bradley–Terry on top of it.

The paper's analysis (Azar et al. 2023, arXiv 2310.12036v2, §4.2) needs a true preference p*(y ≻ y′) to judge
policies by, and data drawn from it with few comparisons per pair. Here the true reward is a fixed bag-of-tokens
network: every token v of the tiny tokenizer gets a weight w_v ~ N(0, GOLD_SCALE²) drawn once from GOLD_SEED, and

    r*(y) = mean over the tokens of y of w_v        (min_v w_v for an empty response)

with p*(y ≻ y′) = σ(r*(y) − r*(y′)) (Bradley–Terry, the paper's eq. 1 model). A fair stand-in for a human because
nothing in the experiment knows it: the tiny model was trained without it, the reward model must learn it from
the sampled comparisons, and the policy can raise it only by moving probability to other responses, which costs
KL(π‖π_ref). Being a mean, it rewards no length. An empty answer is worth the least any answer can be: a first
version scored it 0, well above a typical answer, and offline policies learnt to stop at once. GOLD_SCALE was set
before any policy was trained, so that two samples of the tiny reference differ by 1.7 nats of r* on average and a
typical pair is preferred about 3 : 1 (mean |p* − ½| = 0.25): informative comparisons, not deterministic ones.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from psipo_cli.paper.bandit import Z_95

GOLD_SEED = 231012036  # the paper's arXiv number: the gold weights are the same in every experiment seed
GOLD_SCALE = 4.0


class GoldReward:
    """r*(y) of response texts, exactly, through the tokenizer (special tokens in the text count as tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        generator = torch.Generator().manual_seed(GOLD_SEED)
        self.weights = GOLD_SCALE * torch.randn(len(tokenizer), generator=generator, dtype=torch.float64)
        self.tokenizer = tokenizer
        self.empty = float(self.weights.min())  # no answer: never preferred to an answer (p* ≤ ½ against any)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [float(self.weights[row].mean()) if row else self.empty for row in ids]


def preference(r_a: float, r_b: float) -> float:
    """p*(a ≻ b) = σ(r*(a) − r*(b)) (Bradley–Terry)."""
    return 1.0 / (1.0 + math.exp(r_b - r_a))


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> float:
    """Gold win rate of one prompt's policy samples against its reference samples: the mean of p*(y ≻ y′) over every
    (y, y′) pair. Exact expectation over the gold preference's coin, so no label noise is added on top of sampling."""
    return statistics.fmean(preference(a, b) for a in policy for b in reference)


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts with its 95% confidence half-width (normal, standard error across prompts)."""

    mean: float
    half_width: float

    @classmethod
    def of(cls, per_prompt: Sequence[float]) -> Estimate:
        mean = statistics.fmean(per_prompt)
        spread = statistics.stdev(per_prompt) if len(per_prompt) > 1 else 0.0
        return cls(mean, Z_95 * spread / math.sqrt(len(per_prompt)))

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.half_width}


def votes_for_first(p: float, count: int, generator: torch.Generator) -> int:
    """How many of `count` independent annotators, each following p*, prefer the first response."""
    return int((torch.rand(count, generator=generator, dtype=torch.float64) < p).sum())
