"""The benchmark's synthetic preference data: fixed shapes and length distributions like real datasets'.

Text is random words that are single tokens of the tiny vocabulary, so a pair's token counts are exactly the
lengths drawn (TRL appends EOS to each response: a response of n tokens is n − 1 words + EOS). Lengths are
clipped so that `[prompt | response]` fits `max_length`: no layout truncates, and every trainer scores every token.

The length distributions are assumptions, stated here and written into the JSON with the statistics of the data
actually drawn. Log-normal lengths (in tokens) with these medians and σ of the log:

- "uf-like", modelled on UltraFeedback (binarized, single-turn instructions; prompts from a short question to a
  pasted document, responses from a handful of tokens to over a thousand, chosen ones longer on average): prompt
  median 100 (σ 0.9, at most 512), chosen median 260 and rejected 200 (σ 0.65), max_length 1024, batch 4.
- "hh-like", modelled on Anthropic HH-RLHF (multi-turn dialogue whose history is the prompt, short answers):
  prompt median 130 (σ 0.7, at most 448), responses median 45 (σ 0.8), max_length 512, batch 8.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random, high: int | None = None) -> int:
        top = self.high if high is None else min(self.high, high)
        return max(self.low, min(top, round(rng.lognormvariate(math.log(self.median), self.sigma))))


# name -> how its (prompt, chosen, rejected) lengths are drawn; a fixed shape is (prompt, response) tokens
FIXED = {"prompt-heavy": (192, 64), "response-heavy": (64, 160), "long-context": (1536, 256)}
DISTRIBUTIONS = {
    "uf-like": (LogNormal(100, 0.9, 8, 512), LogNormal(260, 0.65, 4, 10**6), LogNormal(200, 0.65, 4, 10**6)),
    "hh-like": (LogNormal(130, 0.7, 16, 448), LogNormal(45, 0.8, 2, 10**6), LogNormal(45, 0.8, 2, 10**6)),
}


def draw_lengths(shape: str, pairs: int, max_length: int, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of `pairs` pairs, EOS included in the responses."""
    if shape in FIXED:
        prompt, response = FIXED[shape]
        assert prompt + response <= max_length, f"{shape}: longer than max_length"
        return [(prompt, response, response)] * pairs
    rng = random.Random(seed)
    prompt_law, chosen_law, rejected_law = DISTRIBUTIONS[shape]
    lengths = []
    for _ in range(pairs):
        prompt = prompt_law.draw(rng, max_length // 2)  # leaves room for a response
        room = max_length - prompt
        lengths.append((prompt, chosen_law.draw(rng, room), rejected_law.draw(rng, room)))
    return lengths


def single_token_words(tokenizer: Any) -> list[str]:
    """Vocabulary entries ' word' (letters only) that encode back to exactly one token."""
    words = []
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        word = len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
        if word and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
            words.append(text)
    return sorted(words)


def pair_lengths(tokenizer: Any, row: dict[str, str]) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts as TRL's DPOTrainer tokenises a plain row (EOS appended)."""
    eos = tokenizer.eos_token

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(row["prompt"])
    chosen, rejected = ids(row["prompt"] + row["chosen"] + eos), ids(row["prompt"] + row["rejected"] + eos)
    assert chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt, "prompt is not a token prefix"
    return len(prompt), len(chosen) - len(prompt), len(rejected) - len(prompt)


def write_pairs(path: Path, words: list[str], lengths: list[tuple[int, int, int]], seed: int) -> list[dict]:
    """Random single-token words of the given lengths as prompt/chosen/rejected jsonl rows."""
    rng = random.Random(seed)
    rows = []
    for prompt, chosen, rejected in lengths:
        text = ["".join(rng.choices(words, k=n)) for n in (prompt, chosen - 1, rejected - 1)]
        while text[2] == text[1]:
            text[2] = "".join(rng.choices(words, k=rejected - 1))
        rows.append({"prompt": text[0], "chosen": text[1], "rejected": text[2]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def contexts(prompt: int, chosen: int, rejected: int) -> int:
    """Σ over a pair's real tokens of their causal context (itself included): the attention work it needs."""
    return prompt * (prompt + 1) // 2 + sum(n * prompt + n * (n + 1) // 2 for n in (chosen, rejected))


def statistics_of(lengths: list[tuple[int, int, int]]) -> dict[str, dict[str, float]]:
    """Median, mean, 90th percentile and max of prompt and response lengths (responses pooled)."""
    columns = {"prompt": [p for p, _, _ in lengths], "response": [n for _, c, r in lengths for n in (c, r)]}
    return {
        name: {
            "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 1),
            "p90": sorted(values)[int(0.9 * (len(values) - 1))],
            "max": max(values),
        }
        for name, values in columns.items()
    }


def _padded(rows: list[int]) -> int:
    """Tokens a batch of rows computes: every row padded to the longest."""
    return len(rows) * max(rows)


def _next_fit(sizes: list[int], budget: int) -> list[int]:
    """Row lengths when `sizes` go into rows of `budget` tokens in order, as psipo's collator packs a batch."""
    rows: list[int] = []
    for size in sizes:
        if not rows or rows[-1] + size > budget:
            rows.append(0)
        rows[-1] += size
    return rows


def packing_figures(shape: str, data: dict[str, Any], pairs: int = 4000, seed: int = 99) -> dict[str, float]:
    """Padding of packed batches on `pairs` pairs drawn like `shape`'s: a fixed pair count (`batch` pairs a step,
    packed in order into rows of `pack_tokens`) against psipo's batches by tokens (`pack_rows` rows a step), as
    padded tokens per real token, and the pairs a step holds by tokens."""
    from psipo_cli.training.token_budget import plan_batches, row_length

    lengths = draw_lengths(shape, pairs, data["max_length"], seed)
    sizes = [row_length(*pair, data["max_length"]) for pair in lengths]
    budget, batch = data["pack_tokens"], data["batch"]
    fixed = sum(_padded(_next_fit(sizes[i : i + batch], budget)) for i in range(0, pairs, batch))
    plan = plan_batches(sizes, range(pairs), data["pack_rows"], budget)
    by_tokens = sum(_padded(_next_fit([sizes[i] for i in step], budget)) for step in plan)
    return {
        "padding_pair_count": fixed / sum(sizes) - 1,
        "padding_by_tokens": by_tokens / sum(sizes) - 1,
        "pairs_per_step_by_tokens": pairs / len(plan),
    }
