"""Build the tiny, fully offline assets that psipo's tests, examples and smoke runs use.

It writes, deterministically (fixed seeds, no network, CPU only):

* ``data/tiny-prefs/train.jsonl`` (1200 rows) and ``data/tiny-prefs/eval.jsonl`` (200 rows, prompts
  disjoint from train): templated preference pairs from three families (arithmetic, facts, politeness)
  with soft labels from 10 simulated annotators (``p_chosen``, ``votes_chosen``, ``votes_total``).
  About 75% of rows are plain text (``prompt`` ends with ``"\\nAnswer:"``, responses start with a
  space) and about 25% are conversational (lists of ``{"role", "content"}`` messages), mixed in the
  same file.
* ``data/tiny-prefs/README.md`` describing the data.
* ``assets/tiny-llama/``: a byte-level BPE tokenizer trained on the corpus text (with a chat template)
  and a tiny ``LlamaForCausalLM`` trained from scratch with next-token cross-entropy on both the chosen
  and the rejected responses of every training pair, so it models the text but does not prefer
  chosen over rejected. Saved as float32 safetensors (under 3 MB) together with a README.

Rerun from the repository root (under a minute on 2 idle CPU cores)::

    python scripts/make_tiny_assets.py

Running it twice gives byte-identical files (the model too, given the same machine and library
versions). The script asserts its own invariants (chat template
prefix property, token lengths, reload gives the same loss) and prints a summary.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data" / "tiny-prefs"
MODEL_DIR = ROOT / "assets" / "tiny-llama"

SEED = 20240611
N_TRAIN = 1200
N_EVAL = 200
VOTES_TOTAL = 10
CONVERSATIONAL_SHARE = 0.25
MAX_PAIR_TOKENS = 64
FAMILY_SHARE = {"arithmetic": 0.45, "facts": 0.30, "politeness": 0.25}
FAMILY_AGREEMENT = {"arithmetic": 0.95, "facts": 0.90, "politeness": 0.75}

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]
VOCAB_SIZE = 768
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MODEL_KWARGS: dict[str, Any] = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}
TRAIN_STEPS = 400
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
MAX_SIZE_BYTES = 3 * 1024 * 1024

# ----------------------------------------------------------------------------------------------------
# Templated items
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One preference item before formatting: a question and two responses (no leading space)."""

    family: str
    question: str
    chosen: str
    rejected: str


COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a ripe tomato": "red", "a carrot": "orange", "milk": "white", "a lemon": "yellow", "a lime": "green",
    "chocolate": "brown", "a crow": "black", "a flamingo": "pink", "an eggplant": "purple",
    "a strawberry": "red", "a polar bear": "white", "a frog": "green", "a pumpkin": "orange",
    "a cherry": "red", "soil": "brown", "a plum": "purple", "the sea": "blue", "a pig": "pink",
    "a raven": "black", "a cucumber": "green", "a blueberry": "blue", "a sunflower": "yellow",
}  # fmt: skip
SOUNDS = {
    "a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa",
    "a pig": "oink", "an owl": "hoot", "a snake": "hiss", "a lion": "roar", "a horse": "neigh",
    "a bee": "buzz", "a mouse": "squeak", "a frog": "ribbit", "a crow": "caw", "a donkey": "hee-haw",
    "a wolf": "howl", "a dove": "coo", "a chick": "cheep", "a turkey": "gobble", "a goat": "bleat",
}  # fmt: skip
OPPOSITE_PAIRS = [
    ("hot", "cold"), ("up", "down"), ("left", "right"), ("day", "night"), ("wet", "dry"),
    ("fast", "slow"), ("happy", "sad"), ("empty", "full"), ("early", "late"), ("black", "white"),
    ("win", "lose"), ("push", "pull"), ("north", "south"), ("east", "west"), ("above", "below"),
    ("inside", "outside"), ("top", "bottom"), ("first", "last"), ("buy", "sell"), ("rich", "poor"),
    ("thick", "thin"), ("cheap", "expensive"), ("loud", "quiet"), ("strong", "weak"),
    ("clean", "dirty"), ("awake", "asleep"), ("true", "false"), ("before", "after"),
    ("always", "never"), ("friend", "enemy"), ("question", "answer"), ("love", "hate"),
    ("sunrise", "sunset"), ("remember", "forget"), ("accept", "refuse"),
]  # fmt: skip
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Russia": "Moscow", "China": "Beijing", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Sweden": "Stockholm",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Finland": "Helsinki",
    "Hungary": "Budapest", "Denmark": "Copenhagen",
}  # fmt: skip
TASKS = [
    "fix my bike", "write a birthday card", "plan a picnic", "cook some rice", "find a good book",
    "clean my room", "study for a test", "water my plants", "pack for a trip", "write an email",
    "bake a cake", "learn to swim", "choose a gift", "make a budget", "start running", "name my cat",
    "set an alarm", "fold a shirt", "sort my photos", "read a map", "plant some seeds", "wash my car",
    "paint a fence", "learn some French", "practice the piano", "make some tea", "draw a cat",
    "build a kite", "find my keys", "plan a party", "write a poem", "cook pasta", "learn chess",
    "sleep better", "save money", "tidy my desk", "make a salad", "walk my dog", "fix a flat tyre",
    "learn to knit", "bake some bread", "write a thank you note", "clean the kitchen",
    "plan my week", "tune my guitar", "feed my fish", "hang a picture", "iron a shirt",
]  # fmt: skip
REQUEST_TEMPLATES = [
    "Can you help me {t}?", "Could you help me {t}?", "Please help me {t}.", "I need help to {t}.",
    "Would you help me {t}?", "Will you help me {t}?", "Can you show me how to {t}?",
    "Please show me how to {t}.",
]  # fmt: skip
POLITE_TEMPLATES = [
    "Of course! I would be happy to help.", "Sure, let's {t} together.",
    "Happy to help! Let's get started.", "Absolutely, here is how to begin.",
    "Sure thing! Let's {t} step by step.", "Gladly! Let me walk you through it.",
]  # fmt: skip
RUDE_TEMPLATES = [
    "No. Do it yourself.", "Not my problem.", "Ugh, figure it out alone.", "Why should I? No.",
    "I won't help you {t}.", "Stop asking me things.", "No. That is a silly request.", "Go away.",
]  # fmt: skip


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _wrong_choice(rng: random.Random, options: list[str], right: str, avoid: str = "") -> str:
    return rng.choice([o for o in options if o not in (right, avoid)])


def arithmetic_items(rng: random.Random) -> list[Item]:
    """All small +, -, x questions; the rejected answer is off by 1-3."""
    items = []
    ops = [
        ("plus", lambda a, b: a + b, 20),
        ("minus", lambda a, b: a - b, 20),
        ("times", lambda a, b: a * b, 12),
    ]
    for word, fn, top in ops:
        for a in range(1, top + 1):
            for b in range(1, (a if word == "minus" else top) + 1):
                right = fn(a, b)
                wrong = right + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0])
                template = rng.choice(["{a} {w} {b} is {r}.", "The answer is {r}.", "It is {r}."])
                items.append(
                    Item(
                        "arithmetic",
                        f"What is {a} {word} {b}?",
                        template.format(a=a, w=word, b=b, r=right),
                        template.format(a=a, w=word, b=b, r=wrong),
                    )
                )
    return items


def _fact_items(rng: random.Random, table: dict[str, str], questions: list[str], answers: list[str]) -> list[Item]:
    options = sorted(set(table.values()))
    items = []
    for subject, right in table.items():
        wrong = _wrong_choice(rng, options, right, avoid=subject)
        for question in questions:
            answer = rng.choice(answers)
            fill = {"s": subject, "S": _cap(subject)}
            items.append(
                Item(
                    "facts",
                    question.format(**fill),
                    _cap(answer.format(a=right, A=_cap(right), **fill)),
                    _cap(answer.format(a=wrong, A=_cap(wrong), **fill)),
                )
            )
    return items


def fact_items(rng: random.Random) -> list[Item]:
    """Colours, animal sounds, opposites and capitals; the rejected answer is wrong."""
    opposites = {a: b for a, b in OPPOSITE_PAIRS} | {b: a for a, b in OPPOSITE_PAIRS}
    specs = [
        (
            COLOURS,
            ["What colour is {s}?", "What is the colour of {s}?", "Name the colour of {s}."],
            ["{S} is {a}.", "It is {a}.", "The colour is {a}."],
        ),
        (
            SOUNDS,
            ["What sound does {s} make?", "What noise does {s} make?", "How does {s} sound?"],
            ["{S} says {a}.", "It says {a}.", "It goes {a}!"],
        ),
        (
            opposites,
            ["What is the opposite of {s}?", "Give the opposite of {s}.", "Name the opposite of {s}."],
            ["The opposite of {s} is {a}.", "It is {a}.", "That would be {a}."],
        ),
        (
            CAPITALS,
            ["What is the capital of {s}?", "Name the capital of {s}.", "Which city is the capital of {s}?"],
            ["The capital of {s} is {a}.", "It is {a}.", "{A} is the capital."],
        ),
    ]
    return [item for table, qs, ans in specs for item in _fact_items(rng, table, qs, ans)]


def politeness_items(rng: random.Random) -> list[Item]:
    """Requests; chosen is a polite, helpful reply and rejected a curt or rude refusal."""
    items = []
    for task in TASKS:
        yours = task.replace("my ", "your ")
        for request in REQUEST_TEMPLATES:
            polite = rng.choice(POLITE_TEMPLATES).format(t=yours)
            rude = rng.choice(RUDE_TEMPLATES).format(t=yours)
            items.append(Item("politeness", request.format(t=task), polite, rude))
    return items


# ----------------------------------------------------------------------------------------------------
# Rows, labels and files
# ----------------------------------------------------------------------------------------------------


def split_items(rng: random.Random) -> tuple[list[Item], list[Item]]:
    """Draw per-family train/eval items with disjoint questions, then shuffle each split."""
    pools = {
        "arithmetic": arithmetic_items(rng),
        "facts": fact_items(rng),
        "politeness": politeness_items(rng),
    }
    train: list[Item] = []
    evals: list[Item] = []
    for family, share in FAMILY_SHARE.items():
        pool = pools[family]
        assert len({item.question for item in pool}) == len(pool), f"duplicate questions in {family}"
        n_train, n_eval = round(share * N_TRAIN), round(share * N_EVAL)
        assert len(pool) >= n_train + n_eval, f"{family}: pool {len(pool)} < {n_train + n_eval}"
        rng.shuffle(pool)
        evals += pool[:n_eval]
        train += pool[n_eval : n_eval + n_train]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def make_row(item: Item, rng: random.Random) -> dict[str, Any]:
    """Format one item (plain or conversational) and attach simulated annotator votes."""
    assert item.chosen != item.rejected
    assert all(2 <= len(text.split()) <= 12 for text in (item.chosen, item.rejected)), item
    conversational = rng.random() < CONVERSATIONAL_SHARE
    agree = FAMILY_AGREEMENT[item.family]
    votes = sum(rng.random() < agree for _ in range(VOTES_TOTAL))
    if conversational:
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": item.question}],
            "chosen": [{"role": "assistant", "content": item.chosen}],
            "rejected": [{"role": "assistant", "content": item.rejected}],
        }
    else:
        row = {
            "prompt": f"{item.question}\nAnswer:",
            "chosen": f" {item.chosen}",
            "rejected": f" {item.rejected}",
        }
    row |= {"p_chosen": round(votes / VOTES_TOTAL, 2), "votes_chosen": votes, "votes_total": VOTES_TOTAL}
    return row


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_data() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[str]]:
    """Create and write train/eval rows; returns rows and their families."""
    rng = random.Random(SEED)
    train_items, eval_items = split_items(rng)
    train_rows = [make_row(item, rng) for item in train_items]
    eval_rows = [make_row(item, rng) for item in eval_items]
    write_jsonl(DATA_DIR / "train.jsonl", train_rows)
    write_jsonl(DATA_DIR / "eval.jsonl", eval_rows)
    return train_rows, eval_rows, [i.family for i in train_items], [i.family for i in eval_items]


def label_stats(rows: list[dict[str, Any]], families: list[str]) -> dict[str, Any]:
    """Family counts, mean p_chosen per family, share of rows with p_chosen < 0.5, share conversational."""
    by_family: dict[str, list[float]] = defaultdict(list)
    for row, family in zip(rows, families, strict=True):
        by_family[family].append(row["p_chosen"])
    return {
        "count": dict(sorted(Counter(families).items())),
        "mean_p_chosen": {f: round(sum(v) / len(v), 3) for f, v in sorted(by_family.items())},
        "share_below_half": round(sum(r["p_chosen"] < 0.5 for r in rows) / len(rows), 4),
        "share_conversational": round(sum(isinstance(r["prompt"], list) for r in rows) / len(rows), 3),
    }


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


def message_text(row: dict[str, Any], key: str) -> str:
    """The raw text of a prompt/response in either format (plain responses keep their leading space)."""
    value = row[key]
    return value[0]["content"] if isinstance(value, list) else value


def as_plain(row: dict[str, Any]) -> tuple[str, str, str]:
    if isinstance(row["prompt"], str):
        return row["prompt"], row["chosen"], row["rejected"]
    return (
        f"{message_text(row, 'prompt')}\nAnswer:",
        f" {message_text(row, 'chosen')}",
        f" {message_text(row, 'rejected')}",
    )


def as_conversational(row: dict[str, Any]) -> tuple[list[dict[str, str]], ...]:
    if isinstance(row["prompt"], list):
        return row["prompt"], row["chosen"], row["rejected"]
    question = row["prompt"].removesuffix("\nAnswer:")
    return (
        [{"role": "user", "content": question}],
        [{"role": "assistant", "content": row["chosen"].lstrip()}],
        [{"role": "assistant", "content": row["rejected"].lstrip()}],
    )


def bpe_corpus(rows: list[dict[str, Any]]) -> list[str]:
    """Corpus text for BPE training: every row in both formats, without the special tokens."""
    texts = []
    for row in rows:
        prompt, chosen, rejected = as_plain(row)
        texts += [prompt + chosen, prompt + rejected]
        conv_prompt, conv_chosen, conv_rejected = as_conversational(row)
        texts += [f"\n{m[0]['content']}" for m in (conv_prompt, conv_chosen, conv_rejected)]
    return texts


def build_tokenizer(rows: list[dict[str, Any]]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (no post-processor, so no BOS/EOS is added on encode) and wrap it."""
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(bpe_corpus(rows), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=ROLE_TOKENS,
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Assert: no specials auto-added, generation prompt is a string prefix, assistant turn ends in EOS."""
    assert tokenizer("What is 1 plus 2?")["input_ids"] == tokenizer.encode(
        "What is 1 plus 2?", add_special_tokens=False
    )
    assert tokenizer.decode(tokenizer("Hi there\nAnswer: 3.")["input_ids"]) == "Hi there\nAnswer: 3."
    prompt = [{"role": "user", "content": "U"}]
    rendered_prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert rendered_prompt == f"<|user|>\nU{EOS}<|assistant|>\n", rendered_prompt
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "A"}], tokenize=False)
    assert full.startswith(rendered_prompt) and full == rendered_prompt + f"A{EOS}", full


# ----------------------------------------------------------------------------------------------------
# Token-level views of a row (as TRL's DPOTrainer builds them: plain rows get EOS appended)
# ----------------------------------------------------------------------------------------------------


def encode_chat(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], generation: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation, tokenize=True, return_dict=True
    )
    return list(rendered["input_ids"])


def encode_pair(tokenizer: PreTrainedTokenizerFast, row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (prompt, prompt+chosen, prompt+rejected) for a row in its own format."""
    prompt = row["prompt"]
    if isinstance(prompt, list):
        return (
            encode_chat(tokenizer, prompt, generation=True),
            encode_chat(tokenizer, prompt + row["chosen"], generation=False),
            encode_chat(tokenizer, prompt + row["rejected"], generation=False),
        )
    return (
        tokenizer(prompt)["input_ids"],
        tokenizer(prompt + row["chosen"] + EOS)["input_ids"],
        tokenizer(prompt + row["rejected"] + EOS)["input_ids"],
    )


def both_formats(row: dict[str, Any]) -> list[dict[str, Any]]:
    prompt, chosen, rejected = as_plain(row)
    conv_prompt, conv_chosen, conv_rejected = as_conversational(row)
    return [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        {"prompt": conv_prompt, "chosen": conv_chosen, "rejected": conv_rejected},
    ]


def check_lengths(tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, Any]]) -> int:
    """Assert every row, in both formats, fits in MAX_PAIR_TOKENS and the prompt is a token prefix."""
    longest = 0
    for row in rows:
        for view in both_formats(row):
            prompt_ids, chosen_ids, rejected_ids = encode_pair(tokenizer, view)
            for ids in (chosen_ids, rejected_ids):
                assert ids[: len(prompt_ids)] == prompt_ids, f"prompt is not a token prefix: {view}"
                assert ids[-1] == tokenizer.eos_token_id
                longest = max(longest, len(ids))
    assert longest < MAX_PAIR_TOKENS, longest
    return longest


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def lm_sequences(tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, Any]]) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) for prompt+chosen and prompt+rejected of every row in both formats."""
    sequences = []
    for row in rows:
        for view in both_formats(row):
            prompt_ids, chosen_ids, rejected_ids = encode_pair(tokenizer, view)
            sequences += [(chosen_ids, len(prompt_ids)), (rejected_ids, len(prompt_ids))]
    return sequences


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels ignore padding (-100). Also returns a response-only mask."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    response = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (ids, prompt_len) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        response[i, prompt_len : len(ids)] = True
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "response_mask": response}


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_KWARGS,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def lr_at(step: int) -> float:
    """Linear warmup then cosine decay to 10% of the peak learning rate."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, TRAIN_STEPS - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train_model(model: LlamaForCausalLM, sequences: list[tuple[list[int], int]], pad_id: int) -> float:
    """Plain next-token cross-entropy with AdamW; returns the mean loss over the last 50 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    recent: list[float] = []
    model.train()
    for step in range(TRAIN_STEPS):
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(sequences), generator=generator).tolist()
        batch = collate([sequences[i] for i in order[:BATCH_SIZE]], pad_id)
        del order[:BATCH_SIZE]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = [*recent, loss.item()][-50:]
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}")
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def corpus_loss(model: LlamaForCausalLM, sequences: list[tuple[list[int], int]], pad_id: int) -> float:
    """Token-weighted mean next-token loss over all sequences."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), 256):
        batch = collate(sequences[start : start + 256], pad_id)
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += batch_loss(model, batch).item() * n_tokens
        count += n_tokens
    return total / count


@torch.no_grad()
def response_logps(model: LlamaForCausalLM, sequences: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Summed log-prob of the response tokens (after the prompt, EOS included), one per sequence."""
    out = []
    for start in range(0, len(sequences), 256):
        batch = collate(sequences[start : start + 256], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append((token_logps * batch["response_mask"][:, 1:]).sum(-1))
    return torch.cat(out)


def preference_report(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, Any]],
    families: list[str],
) -> dict[str, Any]:
    """Mean summed log-prob of chosen vs rejected responses (rows in their own format), per family."""
    sequences = []
    for row in rows:
        prompt_ids, chosen_ids, rejected_ids = encode_pair(tokenizer, row)
        sequences += [(chosen_ids, len(prompt_ids)), (rejected_ids, len(prompt_ids))]
    logps = response_logps(model, sequences, tokenizer.pad_token_id)
    chosen, rejected = logps[0::2], logps[1::2]
    report: dict[str, Any] = {
        "all": _logp_summary(chosen, rejected),
    }
    for family in sorted(set(families)):
        mask = torch.tensor([f == family for f in families])
        report[family] = _logp_summary(chosen[mask], rejected[mask])
    return report


def _logp_summary(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "logp_chosen": round(chosen.mean().item(), 3),
        "logp_rejected": round(rejected.mean().item(), 3),
        "share_chosen_higher": round((chosen > rejected).float().mean().item(), 3),
    }


def greedy_sample(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, row: dict[str, Any]) -> str:
    prompt_ids = encode_pair(tokenizer, row)[0]
    output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=False)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_and_reload(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, probe: dict[str, torch.Tensor]
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Save float32 safetensors + tokenizer, reload from the folder and assert identical behaviour."""
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)  # transformers 5 always writes model.safetensors
    tokenizer.save_pretrained(MODEL_DIR)
    assert (MODEL_DIR / "model.safetensors").is_file() and not (MODEL_DIR / "pytorch_model.bin").exists()
    loaded = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True)
    loaded_tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    loaded.eval()
    check_tokenizer(loaded_tok)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        before, after = batch_loss(model, probe).item(), batch_loss(loaded, probe).item()
    assert abs(before - after) < 1e-6, (before, after)
    return loaded, loaded_tok


# ----------------------------------------------------------------------------------------------------
# READMEs and main
# ----------------------------------------------------------------------------------------------------


def write_data_readme(train_stats: dict[str, Any], eval_stats: dict[str, Any]) -> None:
    agreement = ", ".join(f"{f} {p}" for f, p in FAMILY_AGREEMENT.items())
    text = f"""# tiny-prefs

Small synthetic preference data for psipo's tests and smoke runs. Generated by
`python scripts/make_tiny_assets.py` (seed {SEED}); rerunning it gives byte-identical files.

- `train.jsonl`: {N_TRAIN} rows; `eval.jsonl`: {N_EVAL} rows. Prompts are disjoint between the two files.

## Families

- **arithmetic** ("What is 7 plus 5?"; plus/minus/times on small numbers): chosen gives the right
  result, rejected the same sentence with a result off by 1-3.
- **facts** (colours of things, animal sounds, opposites, capitals): chosen is correct, rejected names
  a wrong item from the same table.
- **politeness** (requests such as "Can you help me fix my bike?"): chosen is a polite, helpful reply,
  rejected a curt or rude refusal.

Family counts: train {train_stats["count"]}, eval {eval_stats["count"]}.

## Formats (mixed in the same file)

- plain (~75%): `{{"prompt": "What is 7 plus 5?\\nAnswer:", "chosen": " It is 12.",
  "rejected": " It is 13.", ...}}`
  (responses start with a space; no EOS in the text).
- conversational (~25%): `{{"prompt": [{{"role": "user", "content": ...}}], "chosen": [{{"role": "assistant",
  "content": ...}}], "rejected": [...], ...}}`.

Share conversational: train {train_stats["share_conversational"]}, eval {eval_stats["share_conversational"]}.
Note: `prompt`/`chosen`/`rejected` are strings in some rows and message lists in others.
`datasets>=5` loads the file with `Json` features (each row keeps its own type); older versions cannot
infer one schema. TRL's `DPOTrainer` decides whether to append EOS from the first row only, so it fails on
the mixed file as is (`'list' object has no attribute 'endswith'`): convert rows to one format first.

## Soft labels

- `votes_total`: 10 simulated annotators per row; `votes_chosen`: how many preferred `chosen`;
  `p_chosen = votes_chosen / votes_total`.
- Each annotator agrees with the true preference with a family-dependent probability ({agreement}).
- Rows where `p_chosen < 0.5` keep the original chosen/rejected order: the label is then disputed by
  the annotators (noisy data). Share with `p_chosen < 0.5`: train {train_stats["share_below_half"]},
  eval {eval_stats["share_below_half"]}.
- Mean `p_chosen` per family: train {train_stats["mean_p_chosen"]}, eval {eval_stats["mean_p_chosen"]}.
"""
    (DATA_DIR / "README.md").write_text(text, encoding="utf-8")


def logp_table(prefs: dict[str, dict[str, float]]) -> str:
    lines = ["| rows | log p(chosen) | log p(rejected) | share chosen higher |", "|---|---|---|---|"]
    for name, v in prefs.items():
        lines.append(f"| {name} | {v['logp_chosen']} | {v['logp_rejected']} | {v['share_chosen_higher']} |")
    return "\n".join(lines)


def write_model_readme(facts: dict[str, Any]) -> None:
    config = ", ".join(f"{k}={v}" for k, v in MODEL_KWARGS.items())
    text = f"""# tiny-llama

A tiny `LlamaForCausalLM` ({facts["params"]:,} parameters, float32 safetensors) and a byte-level BPE
tokenizer ({facts["vocab"]} tokens), trained from scratch on the text of `data/tiny-prefs/`. It exists so
psipo's tests and demos run offline on CPU in seconds. It is not a useful language model.

Rebuild (from the repository root, under a minute on 2 idle CPU cores):

    python scripts/make_tiny_assets.py

## Tokenizer

- Byte-level BPE (`tokenizers`), vocab {facts["vocab"]}, trained on prompts and both responses of
  train+eval, rendered in both formats.
- Special tokens: `<s>` (bos), `</s>` (eos), `<pad>` (pad), `<unk>`, and `<|system|>`, `<|user|>`,
  `<|assistant|>`. Encoding never adds BOS/EOS.
- Chat template: each message renders as `<|role|>\\n{{content}}</s>`; the generation prompt is
  `<|assistant|>\\n`. So the prompt rendered with `add_generation_prompt=True` is an exact prefix of
  prompt+answer, and an assistant turn ends with `</s>` and nothing after it.

## Model

`LlamaConfig({config}, vocab_size={facts["vocab"]})`.

Trained with next-token cross-entropy on prompt+chosen and prompt+rejected of every **train** row,
each rendered in both formats (plain rows with `</s>` appended, as TRL's DPOTrainer does), so it
models both responses and has no built-in preference for chosen (that is what DPO/IPO adds).
Eval rows were held out of LM training.
AdamW (lr {LEARNING_RATE}, warmup {WARMUP_STEPS}, cosine to 10%, weight decay 0.01), batch {BATCH_SIZE},
{TRAIN_STEPS} steps, seed {SEED}.

- Final train loss (mean of last 50 steps): {facts["train_loss"]:.4f}
- Train corpus loss: {facts["train_corpus_loss"]:.4f} (perplexity {math.exp(facts["train_corpus_loss"]):.2f})
- Eval corpus loss: {facts["eval_corpus_loss"]:.4f} (perplexity {math.exp(facts["eval_corpus_loss"]):.2f})

Eval rows (each in its own format): mean summed log-prob of the response tokens (EOS included) and the
share of pairs where chosen scores higher:

{logp_table(facts["prefs"])}
"""
    (MODEL_DIR / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    start = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    train_rows, eval_rows, train_fams, eval_fams = build_data()
    train_stats, eval_stats = label_stats(train_rows, train_fams), label_stats(eval_rows, eval_fams)
    write_data_readme(train_stats, eval_stats)
    print(f"data: train {train_stats}\n      eval  {eval_stats}")

    tokenizer = build_tokenizer(train_rows + eval_rows)
    longest = check_lengths(tokenizer, train_rows + eval_rows)
    print(f"tokenizer: vocab {len(tokenizer)}, longest prompt+response {longest} tokens")

    pad_id = tokenizer.pad_token_id
    train_seqs, eval_seqs = lm_sequences(tokenizer, train_rows), lm_sequences(tokenizer, eval_rows)
    model = make_model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters; training on {len(train_seqs)} sequences")
    train_start = time.perf_counter()
    train_loss = train_model(model, train_seqs, pad_id)
    print(f"training took {time.perf_counter() - train_start:.1f}s")

    model, tokenizer = save_and_reload(model, tokenizer, collate(eval_seqs[:64], pad_id))
    facts = {
        "params": params,
        "vocab": len(tokenizer),
        "train_loss": train_loss,
        "train_corpus_loss": corpus_loss(model, train_seqs, pad_id),
        "eval_corpus_loss": corpus_loss(model, eval_seqs, pad_id),
        "prefs": preference_report(model, tokenizer, eval_rows, eval_fams),
    }
    write_model_readme(facts)
    size = dir_size(MODEL_DIR)
    assert size <= MAX_SIZE_BYTES, size
    print(f"final train loss {train_loss:.4f} (ppl {math.exp(train_loss):.2f})")
    print(f"corpus loss train {facts['train_corpus_loss']:.4f}, eval {facts['eval_corpus_loss']:.4f}")
    print(f"eval response log-probs: {json.dumps(facts['prefs'])}")
    for row in (eval_rows[0], both_formats(eval_rows[0])[1]):
        print(f"sample {row['prompt']!r} -> {greedy_sample(model, tokenizer, row)!r}")
    print(f"assets/tiny-llama: {size / 1e6:.2f} MB; wall time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
